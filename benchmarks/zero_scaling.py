"""Step time, memory and communication of ZeroAdam's ZeRO stages 1-3 on gloo ranks, against DDP + torch AdamW
measured in the same run on the same model, data and ranks.

    python benchmarks/zero_scaling.py                          # ~20M-parameter GPT, 2 ranks, every variant
    python benchmarks/zero_scaling.py --params-m 50            # the stage-3 figure: ~50M parameters on 2 ranks
    python benchmarks/zero_scaling.py --variants ddp-adamw,s2-int8 --steps 3
    python benchmarks/zero_scaling.py --mesh 2x2 --params-m 5      # hybrid sharding: bytes by mesh dim

A GPT-style transformer (``GPT`` below: tied token embedding and output head, learned positions, pre-norm
``Block``s of causal attention and a 4x MLP) is trained for ``--warmup`` + ``--steps`` iterations by each
variant in turn, all in the same ``--world-size`` gloo processes (one torch thread each):

    ddp-adamw       DistributedDataParallel (its defaults) + torch.optim.AdamW(fused=True): the baseline
    s1-fp32/int8    ZeroAdam(stage=1): moments and master sharded, full gradients reduce-scattered at step()
    s2-fp32/int8    ZeroAdam(stage=2): gradients too, reduced in buckets during backward
    s3-fp32/int8    shard_model(model) + ZeroAdam(stage=3): parameters too, gathered per Block
    hsdp-...        with --mesh RxS: the same on a ("replicate", "shard") mesh, and with 8-bit collectives
                    (-qw: quantized_weights, -qg: quantized_gradients); compared with s3-fp32 over all R*S ranks

Each rank reads its own batches (the same ones for every variant), every variant starts from the same weights,
and the fp32 variants should follow DDP's losses to rounding (``loss_max_rel_diff_vs_ddp``; a large value
means a variant computes something else). Results: the table, and ``benchmarks/results/zero_scaling.json``
under ``settings["<N>M-<W>ranks"]``; a run replaces its own setting's entry and keeps the others (the default
run and the ``--params-m 50`` run share the file, each with its own machine description and time).

[Note: what is measured]
* Step time: one iteration (zero_grad, forward, loss, backward, optimizer step) per call of ``_common.time_fn``:
  median of ``--steps`` after ``--warmup``, on rank 0, and the slowest rank's median beside it. Ranks meet in
  the collectives of every step, so their clocks do not drift apart. Beside it, the CPU seconds (user and
  system, every thread of the rank) per iteration: on a loaded machine other processes take cores away from
  the ranks, which lengthens wall time but not CPU time, so the CPU ratio is the steadier of the two there.
* Memory by category: ``memory_stats()`` (what ZeroAdam holds on this rank) taken after the last ``step()`` and
  before the next ``zero_grad()``, i.e. with the gradients that a step leaves in place (stage 1 and DDP keep
  full ``p.grad``s). For DDP + AdamW: parameters, ``p.grad``, exp_avg + exp_avg_sq; DDP's own gradient buckets
  (a second copy of every gradient with ``gradient_as_bucket_view=False``, its default) are reported beside as
  ``ddp_bucket_bytes``, not in a category.
* Peak full-size buffers: stage 2's ``buckets.peak_live_bytes`` (fp32 full gradients alive at once) and stage
  3's ``peak_live_bytes`` (gathered full parameters alive at once). Neither is tracked for the other variants.
* Peak RSS: measured by a second set of ranks (``--skip-rss`` leaves it out), which run each variant for
  ``RSS_ITERATIONS`` iterations: the resident-set high-water mark (``VmHWM``, reset per variant through
  ``/proc/self/clear_refs``) above the resident size before the variant built its model. The CPU stand-in for
  ``torch.cuda.max_memory_allocated``: it includes activations and communication buffers. Those ranks start
  with ``MALLOC_ENV``, so that glibc maps every tensor over 1 MiB on its own and unmaps it when freed; with
  its defaults, freed tensors stay in the heap and one variant's peak depends on what ran before it (stage 3
  read 459 MiB after DDP and stage 2, 269 MiB this way, on the 20M model). The timed ranks keep glibc's
  defaults, because mapping every large tensor afresh costs page faults: with MALLOC_ENV, stage 3's system
  time per iteration rose from 0.11 s to 0.6 s and DDP's from 0.1 s to 0.2 s.
* Communication: ``comm_stats()["elements"]`` of the last step, in the ZeRO paper's accounting (see
  zeroadam/collectives.py [Note: communication accounting]), against the theory per step and micro-batch:
  stages 1 and 2 2Ψ (reduce-scatter + all-gather), stage 3 3Ψ (all-gather in forward and in backward,
  reduce-scatter), DDP 2Ψ (its all-reduce is a reduce-scatter plus an all-gather). Ψ is the model's parameter
  count; ZeroAdam's flat buffers are padded to whole 256-element blocks per rank, so its figure sits slightly
  above the theory. Stage 3's root unit (embeddings, final norm: everything outside the ``Block``s) stays
  gathered from forward through backward, so it is gathered once, and stage 3 moves 3Ψ minus the root's size. DDP's elements are the sizes of its gradient buckets (from ``_get_ddp_logging_data``),
  each all-reduced once per step, counted twice.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import io
import itertools
import json
import os
import queue as queue_mod
import resource
import signal
import socket
import sys
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from _common import RESULTS_DIR, describe_machine, format_table, time_fn, write_json

__all__ = ["GPTConfig", "Block", "GPT", "Variant", "VARIANTS", "run_ranks", "measure_rank", "summarize", "main"]

RESULT_FILE = "zero_scaling.json"

# The same hyperparameters for every variant (step_speed.py's): weight decay on, so its term is in every update.
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

# For the ranks that measure peak RSS only: glibc maps every allocation over 1 MiB on its own and unmaps it when
# freed, instead of keeping it in a heap that the next variant would reuse (see [Note: what is measured]).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab: int = 8192
    """Small next to GPT-2's 50257 so that the output head does not dominate a ~20M model's compute."""
    ctx: int = 128
    """Sequence length of every batch (and the size of the position table)."""
    d_model: int = 512
    n_layer: int = 5
    n_head: int = 8
    """d_model / 64, as in GPT-2."""

    @staticmethod
    def block_params(d: int) -> int:
        # qkv 3d^2 + 3d, attention out d^2 + d, MLP 4d^2 + 4d and 4d^2 + d, two LayerNorms 4d.
        return 12 * d * d + 13 * d

    def num_params(self) -> int:
        d = self.d_model
        return self.vocab * d + self.ctx * d + self.n_layer * self.block_params(d) + 2 * d

    @classmethod
    def for_params(cls, params_m: float, *, vocab: int = 8192, ctx: int = 128) -> "GPTConfig":
        """A width that grows with the size asked for (768 is GPT-2 small's), and the depth that reaches it."""
        target = params_m * 1e6
        d = 384 if target < 12e6 else 512 if target < 35e6 else 768 if target < 200e6 else 1024 if target < 600e6 else 2048
        rest = target - vocab * d - ctx * d - 2 * d
        n_layer = max(1, round(rest / cls.block_params(d)))
        return cls(vocab=vocab, ctx=ctx, d_model=d, n_layer=n_layer, n_head=d // 64)


class Block(nn.Module):
    """Pre-norm transformer block; the class name is one ``shard_model`` makes a unit by default."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2: one parameter used at both ends
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str
    stage: Optional[int]
    """ZeroAdam's stage; None for the DDP + torch AdamW baseline."""
    state_dtype: Literal["fp32", "int8", "bf16"] = "fp32"
    mesh: bool = False
    """On the ``--mesh`` (replicate, shard) DeviceMesh (hybrid sharding)."""
    quantized_weights: bool = False
    quantized_gradients: bool = False
    bf16_params: bool = False  # the model cast to bf16 (compact master weights)
    grad_dtype: Literal["fp32", "bf16"] = "fp32"
    release_grads: bool = False

    @property
    def theory_factor(self) -> int:
        """Elements communicated per step and micro-batch, in units of Ψ (see [Note: what is measured])."""
        return 3 if self.stage == 3 else 2


BASELINE = "ddp-adamw"
VARIANTS: tuple[Variant, ...] = (
    Variant(name=BASELINE, stage=None),
    *(Variant(name=f"s{s}-{f}", stage=s, state_dtype=f) for s in (1, 2, 3) for f in ("fp32", "int8")),  # type: ignore[arg-type]
    # Gradient memory (README "Gradient memory"): bf16 parameters and int8 moments, then bf16 gradient shards,
    # then release_grads. Not run by default (--variants names them).
    Variant(name="s2-bf16p-g16", stage=2, state_dtype="int8", bf16_params=True, grad_dtype="bf16"),
    Variant(name="s3-bf16p", stage=3, state_dtype="int8", bf16_params=True),
    Variant(name="s3-bf16p-g16", stage=3, state_dtype="int8", bf16_params=True, grad_dtype="bf16"),
    Variant(name="s3-bf16p-release", stage=3, state_dtype="int8", bf16_params=True, grad_dtype="bf16",
            release_grads=True),
)
MESH_VARIANTS: tuple[Variant, ...] = (
    Variant(name=BASELINE, stage=None),
    Variant(name="s3-fp32", stage=3),
    *(
        Variant(name=f"hsdp-s{s}{'-qw' if qw else ''}{'-qg' if qg else ''}", stage=s, mesh=True, quantized_weights=qw,
                quantized_gradients=qg)
        for s in (2, 3) for qw, qg in ((False, False), (False, True), (True, False), (True, True))
    ),
)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if not v.bf16_params)


# ---------------------------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> Optional[int]:
    """Reset VmHWM to the current RSS (Linux >= 4.0); the current RSS in bytes, or None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def _peak_rss() -> Optional[int]:
    hwm = _status_kib("VmHWM")
    return None if hwm is None else hwm * 1024


def _tensor_bytes(ts: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ---------------------------------------------------------------------------------------------- one rank
Phase = Literal["time", "rss"]


@dataclass(frozen=True, kw_only=True)
class RunArgs:
    """What every rank needs to know (it travels to the spawned processes by pickling)."""

    cfg: GPTConfig
    batch: int
    warmup: int
    steps: int
    seed: int
    variants: tuple[Variant, ...]
    bucket_size: Optional[int]
    """ZeroAdam's bucket_size (elements) for stages 1-2; None keeps its default."""
    phase: Phase
    """"time": step time, memory_stats, communication; "rss": only the peak RSS, over RSS_ITERATIONS iterations."""
    mesh_shape: Optional[tuple[int, int]] = None
    """(replicate, shard) for the hsdp variants."""


RSS_ITERATIONS = 2  # the first step creates the state; the second is a steady one, in case it peaks higher


def _batches(cfg: GPTConfig, batch: int, n: int, seed: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``n`` batches of random tokens (inputs, next-token targets), the same for every variant."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.vocab, (batch, cfg.ctx + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _build(v: Variant, a: RunArgs) -> tuple[nn.Module, torch.optim.Optimizer]:
    from zeroadam import ZeroAdam, shard_model

    torch.manual_seed(a.seed)
    model: nn.Module = GPT(a.cfg)
    if v.stage is None:
        model = nn.parallel.DistributedDataParallel(model)
        return model, torch.optim.AdamW(model.parameters(), **HYPER, fused=True)
    mesh = _mesh(a.mesh_shape) if v.mesh else None
    if v.bf16_params:
        model = model.to(torch.bfloat16)
    if v.stage == 3:
        model = shard_model(model, mesh=mesh)
    extra: dict[str, Any] = {} if a.bucket_size is None else {"bucket_size": a.bucket_size}
    if v.mesh:
        extra.update(mesh=mesh, quantized_weights=v.quantized_weights, quantized_gradients=v.quantized_gradients)
    if v.grad_dtype != "fp32" or v.release_grads:
        extra.update(grad_dtype=v.grad_dtype, release_grads=v.release_grads)
    opt = ZeroAdam(model.parameters(), **HYPER, state_dtype=v.state_dtype, stage=v.stage, **extra)
    return model, opt


_MESHES: dict[tuple[int, int], Any] = {}


def _mesh(shape: Optional[tuple[int, int]]) -> Any:
    """One DeviceMesh per process (creating one makes process groups: collective, so once)."""
    from torch.distributed.device_mesh import init_device_mesh

    assert shape is not None, "an hsdp variant needs --mesh"
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    return _MESHES[shape]


def _ddp_stats(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, int], int]:
    """(memory by category, bytes of DDP's gradient buckets) for DDP + torch AdamW."""
    params = list(model.parameters())
    state = [t for p in params for k, t in opt.state.get(p, {}).items() if k in ("exp_avg", "exp_avg_sq")]
    mem = {
        "param_bytes": _tensor_bytes(params),
        "grad_bytes": _tensor_bytes([p.grad for p in params]),
        "state_bytes": _tensor_bytes(state),
        "master_bytes": 0,
    }
    sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))  # type: ignore[operator]
    return mem, sum(int(s) for s in sizes.split(",") if s.strip())


def _iteration(model: nn.Module, opt: torch.optim.Optimizer, batches: list, losses: list[float]) -> Callable[[], None]:
    counter = itertools.count()

    def iteration() -> None:
        x, y = batches[next(counter) % len(batches)]
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return iteration


def _peak_rss_of(v: Variant, a: RunArgs, rank: int) -> dict[str, Any]:
    gc.collect()
    before = _reset_peak_rss()
    model, opt = _build(v, a)
    iteration = _iteration(model, opt, _batches(a.cfg, a.batch, RSS_ITERATIONS, a.seed, rank), [])
    for _ in range(RSS_ITERATIONS):
        iteration()
    peak = _peak_rss()
    del model, opt, iteration
    return {"variant": v.name, "peak_rss_bytes": None if peak is None or before is None else peak - before}


def _time_variant(v: Variant, a: RunArgs, rank: int) -> dict[str, Any]:
    gc.collect()
    model, opt = _build(v, a)
    losses: list[float] = []
    iteration = _iteration(model, opt, _batches(a.cfg, a.batch, a.warmup + a.steps, a.seed, rank), losses)
    for _ in range(a.warmup):
        iteration()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    timing = time_fn(iteration, warmup=0, repeats=a.steps)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "variant": v.name,
        "median_s": timing.median_s,
        "min_s": timing.min_s,
        "samples_s": timing.samples_s,
        # CPU seconds of this process (every thread, gloo's included) per timed iteration: less sensitive than
        # wall time to other processes on a shared machine, which take cores away but not CPU time.
        "cpu_user_s": (cpu1.ru_utime - cpu0.ru_utime) / a.steps,
        "cpu_sys_s": (cpu1.ru_stime - cpu0.ru_stime) / a.steps,
        "losses": losses,
        "peak_full_grad_bytes": None,
        "peak_full_param_bytes": None,
    }
    if v.stage is None:
        out["memory"], bucket_bytes = _ddp_stats(model, opt)
        out["ddp_bucket_bytes"] = bucket_bytes
        # One all-reduce of every bucket per step: 2x its elements in the ZeRO accounting.
        out["comm_elements"] = {"all_reduce": bucket_bytes // 4}
        out["comm_elements_zero_accounting"] = 2 * (bucket_bytes // 4)
        out["comm_bytes"] = 2 * bucket_bytes
    else:
        out["memory"] = opt.memory_stats()  # type: ignore[attr-defined]
        comm = opt.comm_stats()  # type: ignore[attr-defined]
        out["comm_elements"] = dict(comm["elements"])
        out["comm_elements_zero_accounting"] = sum(comm["elements"].values())
        out["comm_bytes"] = comm["total_bytes"]
        out["comm_bytes_by_kind"] = dict(comm["bytes"])
        if "by_dim" in comm:
            out["comm_bytes_by_dim"] = {d: dict(s["bytes"]) for d, s in comm["by_dim"].items()}
        buckets = getattr(getattr(opt, "engine", None), "buckets", None)  # internal; None with one rank
        if v.stage == 2 and buckets is not None:
            out["peak_full_grad_bytes"] = buckets.peak_live_bytes
        if v.stage == 3:
            out["peak_full_param_bytes"] = model._zeroadam_sharded.peak_live_bytes  # type: ignore[union-attr]
    del model, opt, iteration
    return out


def measure_rank(rank: int, world: int, a: RunArgs) -> dict[str, Any]:
    """Every variant on this rank, in order. A variant that raises is recorded as failed and the rank stops there:
    its peers may be left inside a collective, so no later variant could be trusted."""
    results: dict[str, Any] = {}
    for v in a.variants:
        try:
            results[v.name] = _time_variant(v, a, rank) if a.phase == "time" else _peak_rss_of(v, a, rank)
        except Exception as exc:  # noqa: BLE001 - the variants before it keep their numbers
            traceback.print_exc(file=sys.stderr)
            results[v.name] = {"variant": v.name, "error": f"{type(exc).__name__}: {exc}"}
            break
        gc.collect()
        dist.barrier()  # the next variant starts together on every rank
    return results


# ---------------------------------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: end this rank when the benchmark process dies (run_all's timeout kills it), instead of leaving it
    waiting in a collective for gloo's timeout. Elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, q: Any) -> None:
    _die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        result = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(result, buf)  # by value: shared-memory handles die with this process
        q.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        q.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout_s: float, env: Optional[dict[str, str]] = None
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned gloo ranks (one torch thread each); results by rank.

    ``env`` is added to the environment the ranks start with (glibc reads its MALLOC_ variables at start)."""
    added = {"OMP_NUM_THREADS": "1", **(env or {})}
    saved = {k: os.environ.get(k) for k in added}
    os.environ.update(added)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, q), daemon=True) for r in range(world)]
    try:
        for p in procs:
            p.start()
    finally:
        for k, old in saved.items():  # this process, and a later spawn, keep their own environment
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
    results: dict[int, bytes] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world):
            try:
                rank, status, payload = q.get(timeout=timeout_s)
            except queue_mod.Empty:
                raise RuntimeError(f"ranks did not finish within {timeout_s:.0f} s (done: {sorted(results)})") from None
            (results if status == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(f"rank {r}:\n{msg}" for r, msg in sorted(errors.items())))
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------------------- summary
def _rel_diff(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    if not xs or len(xs) != len(ys):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(xs, ys))


def summarize(
    per_rank: list[dict[str, Any]],
    rss_per_rank: Optional[list[dict[str, Any]]],
    variants: Sequence[Variant],
    psi: int,
    world: int,
) -> list[dict[str, Any]]:
    """One row per variant: rank 0's figures, every rank's memory, and the ratios against DDP and the theory."""
    rows: list[dict[str, Any]] = []

    def rss(rank: int, name: str) -> Optional[int]:
        entry = None if rss_per_rank is None else rss_per_rank[rank].get(name)
        return None if entry is None or "error" in entry else entry["peak_rss_bytes"]

    base = per_rank[0].get(BASELINE)
    base_ok = base is not None and "error" not in base
    for v in variants:
        r0 = per_rank[0].get(v.name)
        if r0 is None:
            rows.append({"variant": v.name, "status": "not run", "reason": "an earlier variant failed on some rank"})
            continue
        errs = [pr[v.name]["error"] for pr in per_rank if v.name in pr and "error" in pr[v.name]]
        if errs:
            rows.append({"variant": v.name, "status": "failed", "reason": errs[0]})
            continue
        ranks = [pr[v.name] for pr in per_rank]
        mem = [rk["memory"] for rk in ranks]
        state_total = sum(m["state_bytes"] + m["master_bytes"] for m in mem)
        mine = mem[0]["state_bytes"] + mem[0]["master_bytes"]
        theory = v.theory_factor * psi
        row: dict[str, Any] = {
            "variant": v.name,
            "status": "ok",
            "stage": v.stage,
            "state_dtype": v.state_dtype,
            "median_s": r0["median_s"],
            "min_s": r0["min_s"],
            "samples_s": r0["samples_s"],
            "slowest_rank_median_s": max(rk["median_s"] for rk in ranks),
            "cpu_user_s": r0["cpu_user_s"],
            "cpu_sys_s": r0["cpu_sys_s"],
            "memory_per_rank": mem,
            "model_state_bytes_rank0": sum(mem[0].values()),
            "state_fraction_of_all_ranks": mine / state_total if state_total else None,
            "ideal_state_fraction": 1.0 / world,
            "peak_rss_bytes_per_rank": [rss(i, v.name) for i in range(len(per_rank))],
            "peak_full_grad_bytes": r0["peak_full_grad_bytes"],
            "peak_full_param_bytes": r0["peak_full_param_bytes"],
            "comm_elements": r0["comm_elements"],
            "comm_elements_per_step": r0["comm_elements_zero_accounting"],
            "comm_bytes_per_step": r0["comm_bytes"],
            "comm_bytes_by_kind": r0.get("comm_bytes_by_kind"),
            "comm_bytes_by_dim": r0.get("comm_bytes_by_dim"),
            "comm_theory_elements": theory,
            "comm_theory_formula": f"{v.theory_factor}Ψ",
            "comm_ratio_vs_theory": r0["comm_elements_zero_accounting"] / theory,
            "losses_rank0": r0["losses"],
        }
        if v.stage is None:
            row["ddp_bucket_bytes"] = r0["ddp_bucket_bytes"]
        if base_ok:
            b0 = base
            row["step_time_vs_ddp"] = r0["median_s"] / b0["median_s"]
            row["cpu_time_vs_ddp"] = (r0["cpu_user_s"] + r0["cpu_sys_s"]) / (b0["cpu_user_s"] + b0["cpu_sys_s"])
            b_state = b0["memory"]["state_bytes"] + b0["memory"]["master_bytes"]
            row["state_vs_ddp"] = mine / b_state if b_state else None
            row["model_state_vs_ddp"] = row["model_state_bytes_rank0"] / sum(b0["memory"].values())
            b_rss, my_rss = rss(0, BASELINE), rss(0, v.name)
            row["peak_rss_vs_ddp"] = my_rss / b_rss if b_rss and my_rss is not None else None
            row["loss_max_rel_diff_vs_ddp"] = _rel_diff(r0["losses"], b0["losses"])
        rows.append(row)
    return rows


def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _x(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(rows: Sequence[dict[str, Any]]) -> str:
    headers = [
        "variant", "ms/step", "vs DDP", "cpu ms (sys)", "params MiB", "grads MiB", "state MiB", "master MiB", "state frac",
        "peak full MiB", "peak RSS MiB", "comm elems", "vs theory", "loss diff",
    ]
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["variant"], *["-"] * 12, f"{r['status']}: {r['reason'][:80]}"])
            continue
        m = r["memory_per_rank"][0]
        full = r["peak_full_grad_bytes"] if r["peak_full_grad_bytes"] is not None else r["peak_full_param_bytes"]
        diff = r.get("loss_max_rel_diff_vs_ddp")
        out.append(
            [
                r["variant"],
                f"{r['median_s'] * 1e3:.0f}",
                _x(r.get("step_time_vs_ddp")),
                f"{(r['cpu_user_s'] + r['cpu_sys_s']) * 1e3:.0f} ({r['cpu_sys_s'] * 1e3:.0f})",
                _mb(m["param_bytes"]),
                _mb(m["grad_bytes"]),
                _mb(m["state_bytes"]),
                _mb(m["master_bytes"]),
                "-" if r["state_fraction_of_all_ranks"] is None else f"{r['state_fraction_of_all_ranks']:.3f}",
                _mb(full),
                _mb(r["peak_rss_bytes_per_rank"][0]),
                f"{r['comm_elements_per_step'] / 1e6:.2f}M ({r['comm_theory_formula']})",
                f"{r['comm_ratio_vs_theory']:.3f}",
                "-" if diff is None else f"{diff:.1e}",
            ]
        )
    return format_table(headers, out, left=(0,))


def figures(rows: Sequence[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """The issue's figures, reported as measured (not tuned to): each with its target and whether it was met."""
    by = {r["variant"]: r for r in rows if r["status"] == "ok"}
    out = []
    for name in ("s2-fp32", "s2-int8"):
        r = by.get(name)
        if r and r.get("step_time_vs_ddp") is not None:
            out.append(
                {
                    "figure": f"{name} step time / DDP + AdamW step time",
                    "target": "<= 1.05",
                    "value": r["step_time_vs_ddp"],
                    "met": r["step_time_vs_ddp"] <= 1.05,
                    # The same ratio in CPU time per iteration: steadier on a loaded machine.
                    "cpu_time_ratio": r.get("cpu_time_vs_ddp"),
                }
            )
    for name, r in by.items():
        if r["stage"]:
            frac = r["state_fraction_of_all_ranks"]
            out.append(
                {
                    "figure": f"{name} state + master bytes on rank 0 / all ranks' sum",
                    "target": f"~ 1/N = {1 / world:.3f}",
                    "value": frac,
                    "met": frac is not None and abs(frac - 1 / world) <= 0.02,
                }
            )
    return out


def mesh_figures(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes per step of rank 0 by mesh dim (--mesh): what crosses "replicate" (the machines' link in a real run)
    against flat stage 3 over all ranks, whose every collective spans the machines; and the gathered bytes of
    quantized_weights against fp32 gathers."""
    by = {r["variant"]: r for r in rows if r["status"] == "ok"}
    flat = by.get("s3-fp32")
    out: list[dict[str, Any]] = []
    if flat is None:
        return out
    for name, r in by.items():
        dims = r.get("comm_bytes_by_dim")
        if not name.startswith("hsdp-") or not dims:
            continue
        across = sum(dims["replicate"].values())
        out.append({"figure": f"{name} bytes across 'replicate' / s3-fp32 bytes over all ranks",
                    "value": across / flat["comm_bytes_per_step"], "across_bytes": across,
                    "flat_bytes": flat["comm_bytes_per_step"]})
        gathered = sum(v for k, v in dims["shard"].items() if k.startswith("all_gather"))
        plain = by.get(name.replace("-qw", ""))
        if "-qw" in name and plain is not None:
            plain_gathered = sum(v for k, v in plain["comm_bytes_by_dim"]["shard"].items() if k.startswith("all_gather"))
            out.append({"figure": f"{name} gathered bytes / fp32 gathers", "target": "<= 0.27",
                        "value": gathered / plain_gathered, "met": gathered / plain_gathered <= 0.27})
    return out


def _merge_write(key: str, setting: dict[str, Any]) -> str:
    """Replace this setting's entry in the result file, keeping the other settings' entries."""
    path = RESULTS_DIR / RESULT_FILE
    settings: dict[str, Any] = {}
    try:
        old = json.loads(path.read_text())
        if isinstance(old.get("settings"), dict):
            settings = old["settings"]
    except (OSError, ValueError):
        pass
    settings[key] = setting
    return str(write_json(RESULT_FILE, {"benchmark": "zero_scaling", "settings": settings}))


# ---------------------------------------------------------------------------------------------- main
def _select(spec: Optional[str]) -> tuple[Variant, ...]:
    if spec is None:
        return DEFAULT_VARIANTS
    names = {v.name: v for v in VARIANTS}
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        raise ValueError(f"invalid --variants entries {unknown or spec!r}; known: {', '.join(names)}")
    # The baseline always runs (first): every ratio is against it.
    return tuple(v for v in VARIANTS if v.name in wanted or v.name == BASELINE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--world-size", type=int, default=2, help="gloo ranks (processes), one torch thread each")
    ap.add_argument("--params-m", type=float, default=20.0, help="model size in millions of parameters (default 20)")
    ap.add_argument("--steps", type=int, default=5, help="timed iterations per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (the first builds the state)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per iteration")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--variants", help=f"comma-separated subset of {', '.join(v.name for v in VARIANTS)}")
    ap.add_argument(
        "--skip-rss", action="store_true", help="leave out the second set of ranks that measures peak RSS"
    )
    ap.add_argument(
        "--bucket-size",
        type=int,
        help="ZeroAdam's bucket_size in elements (default: its own, 5M elements = 20 MB of fp32; "
        "DDP's bucket_cap_mb=25 is 6.5M fp32 elements)",
    )
    ap.add_argument(
        "--mesh", help="RxS: hybrid sharding on a (replicate, shard) mesh of R*S ranks (sets --world-size); runs "
        "the hsdp variants against s3-fp32 over all ranks and reports bytes by mesh dim",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed to the whole run")
    args = ap.parse_args(argv)
    if args.world_size < 1 or args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.ctx < 1:
        ap.error("--world-size, --steps, --batch and --ctx must be >= 1, --warmup >= 0")
    if not args.params_m > 0:
        ap.error(f"invalid --params-m={args.params_m!r}; expected a positive number of millions")
    if args.bucket_size is not None and args.bucket_size < 1:
        ap.error(f"invalid --bucket-size={args.bucket_size!r}; expected a positive number of elements")
    mesh_shape: Optional[tuple[int, int]] = None
    if args.mesh is not None:
        try:
            r, s = (int(x) for x in args.mesh.lower().split("x"))
            assert r >= 1 and s >= 1
        except (ValueError, AssertionError):
            ap.error(f"invalid --mesh={args.mesh!r}; expected RxS, for example 2x2")
        mesh_shape, args.world_size = (r, s), r * s
    try:
        variants = MESH_VARIANTS if mesh_shape else _select(args.variants)
    except ValueError as exc:
        ap.error(str(exc))

    cfg = GPTConfig.for_params(args.params_m, ctx=args.ctx)
    psi = cfg.num_params()
    machine = describe_machine("cpu")
    machine["torch_threads"] = 1  # per rank (set in each spawned process)
    print(
        f"# {machine['cpu_model']}, {machine['cpu_usable']} cores, torch {machine['torch']}, "
        f"load {machine['loadavg_1_5_15']}",
        flush=True,
    )
    print(
        f"# GPT: {psi / 1e6:.2f}M parameters (d_model {cfg.d_model}, {cfg.n_layer} Blocks, vocab {cfg.vocab}, "
        f"ctx {cfg.ctx}); {args.world_size} gloo ranks x 1 thread, batch {args.batch} x {cfg.ctx} tokens per rank; "
        f"{args.warmup} + {args.steps} iterations per variant: {', '.join(v.name for v in variants)}",
        flush=True,
    )
    run_args = RunArgs(
        cfg=cfg, batch=args.batch, warmup=args.warmup, steps=args.steps, seed=args.seed, variants=variants,
        bucket_size=args.bucket_size, phase="time", mesh_shape=mesh_shape,
    )
    per_rank = run_ranks(measure_rank, args.world_size, run_args, timeout_s=args.timeout)
    rss_per_rank = None
    if not args.skip_rss:
        print(f"# peak RSS: {RSS_ITERATIONS} iterations per variant on fresh ranks started with {MALLOC_ENV}", flush=True)
        rss_args = replace(run_args, phase="rss")
        rss_per_rank = run_ranks(measure_rank, args.world_size, rss_args, timeout_s=args.timeout, env=MALLOC_ENV)
    machine["loadavg_after"] = describe_machine("cpu")["loadavg_1_5_15"]
    rows = summarize(per_rank, rss_per_rank, variants, psi, args.world_size)
    figs = figures(rows, args.world_size) + (mesh_figures(rows) if mesh_shape else [])

    print(
        f"\none iteration (forward + backward + step), {psi / 1e6:.1f}M parameters, {args.world_size} ranks; "
        f"median of {args.steps}; memory per rank (rank 0) after step(); comm elements per step"
    )
    print(table(rows))
    for f in figs:
        cpu = f"; in CPU time {f['cpu_time_ratio']:.3f}" if f.get("cpu_time_ratio") is not None else ""
        verdict = f" (target {f['target']}) {'met' if f['met'] else 'NOT met'}" if "target" in f else ""
        print(f"# figure: {f['figure']}: {f['value']:.3f}{verdict}{cpu}")
    key = f"{round(args.params_m)}M-{args.world_size}ranks" + (f"-mesh{args.mesh}" if mesh_shape else "")
    path = _merge_write(
        key,
        {
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "config": {
                "params": psi,
                "params_m_requested": args.params_m,
                "model": asdict(cfg),
                "world_size": args.world_size,
                "batch_per_rank": args.batch,
                "tokens_per_rank": args.batch * cfg.ctx,
                "warmup": args.warmup,
                "steps": args.steps,
                "seed": args.seed,
                "hyper": HYPER,
                "variants": [asdict(v) for v in variants],
                "baseline": BASELINE,
                "zeroadam_bucket_size": args.bucket_size,
                "rss_malloc_env": None if args.skip_rss else MALLOC_ENV,
                "rss_iterations": None if args.skip_rss else RSS_ITERATIONS,
            },
            "rows": rows,
            "figures": figs,
        },
    )
    print(f"\nwrote {path} (settings[{key!r}])")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
