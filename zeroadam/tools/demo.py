"""``zeroadam demo``: train a small GPT-2-style model with ZeroAdam on several processes, then with DDP + torch AdamW, and compare.

The model is a Hugging Face ``GPT2LMHeadModel`` built from a config (nothing is downloaded); the text is the
CPython standard library's own source, read byte by byte from a sorted prefix of its top-level ``.py`` files, so
every machine with the same Python trains on the same data. Both runs see the same batches in the same order,
start from the same weights and use the same schedule, clipping and hyperparameters; only the optimizer (and
with it the gradient communication) differs. Ranks are spawned here with ``torch.multiprocessing``: gloo on CPU,
NCCL with every visible GPU when CUDA is present.

The output directory receives ``results.json`` (everything printed, plus the per-step losses of every run) and
``demo.png`` (loss curves and per-rank memory by category).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import socket
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F

from zeroadam import _compat
from zeroadam.options import StateDtype

__all__ = ["ModelSize", "MODEL_SIZES", "DemoConfig", "load_corpus", "build_model", "add_demo_arguments", "run_demo"]

VOCAB_SIZE = 256
"""Byte-level tokens: every source file reads the same way whatever its encoding, and no tokenizer is needed."""

SizeName = Literal["tiny", "small", "medium"]


@dataclass(frozen=True, kw_only=True)
class ModelSize:
    n_layer: int
    n_embd: int
    n_head: int
    context: int
    batch_per_rank: int
    """Sequences per rank per step; the global batch grows with the world size, as with DDP."""


MODEL_SIZES: dict[str, ModelSize] = {
    # For tests: a few steps in seconds. n_embd 64 keeps every weight matrix >= 4096 elements (int8 path).
    "tiny": ModelSize(n_layer=2, n_embd=64, n_head=4, context=64, batch_per_rank=4),
    # The default: 0.66 M parameters (0.6 M of them in int8-stored tensors); ~0.15 s per step per rank on one
    # loaded CPU core, so 300 steps of both runs take about two minutes on 2 cores.
    "small": ModelSize(n_layer=2, n_embd=128, n_head=4, context=128, batch_per_rank=8),
    # For a GPU or a patient CPU.
    "medium": ModelSize(n_layer=6, n_embd=256, n_head=8, context=256, batch_per_rank=8),
}

_BETAS = (0.9, 0.95)
_WEIGHT_DECAY = 0.1
_CLIP = 1.0
_EVAL_BATCHES = 4
_LAST = 10  # the "final" training loss is the mean of the last _LAST steps (one step's loss is noisy)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    stage: int = 2
    state_dtype: StateDtype = "int8"
    world_size: int = 2
    steps: int = 300
    size: SizeName = "small"
    out: Path = Path("demo_out")
    lr: float = 3e-3
    """Byte-level models this small train fastest near 3e-3 (with warmup and a cosine decay)."""
    seed: int = 0
    corpus_bytes: int = 2_000_000
    """About 74 files of a CPython 3.11 stdlib: far more text than a few hundred steps read."""
    cuda: bool = False


# ---------------------------------------------------------------------------------------------- data and model
def load_corpus(max_bytes: int) -> tuple[bytes, list[str]]:
    """The first ``max_bytes`` of the standard library's top-level ``.py`` files in sorted order, and their names."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise RuntimeError(f"zeroadam demo: found no .py files in the standard library directory {root}")
    chunks, names, total = [], [], 0
    for f in files:
        chunks.append(f.read_bytes())
        names.append(f.name)
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes], names


def build_model(size: ModelSize, seed: int) -> torch.nn.Module:
    transformers = _compat.require("transformers", "zeroadam demo")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=size.context,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        # No dropout: the two runs then differ only by their optimizer.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def _batch(tokens: torch.Tensor, size: ModelSize, seed: int, world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a global batch of random windows; the same for every optimizer."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - size.context - 1, (world * size.batch_per_rank,), generator=g)
    mine = starts[rank * size.batch_per_rank : (rank + 1) * size.batch_per_rank]
    windows = tokens[mine[:, None] + torch.arange(size.context + 1)]
    return windows[:, :-1], windows[:, 1:]


def _param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": _WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------- one rank
def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ddp_memory(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    state = [st[k] for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st]
    return {
        "param_bytes": _bytes(params),
        "grad_bytes": _bytes(p.grad for p in params if p.grad is not None),
        "state_bytes": _bytes(state),
        "master_bytes": 0,
    }


def _fused_adamw(device: torch.device) -> bool:
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type == "cuda" or _compat.has_fused_cpu_adamw()


def _setup(kind: str, cfg: DemoConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, Any, str]:
    """(model, the module to call, optimizer, its display name) for one run."""
    from torch.nn.parallel import DistributedDataParallel

    from zeroadam.optimizer import ZeroAdam

    model = build_model(MODEL_SIZES[cfg.size], cfg.seed).to(device)
    if kind == "zeroadam":
        if cfg.stage == 3:
            from zeroadam.sharding.model import shard_model

            model = shard_model(model)
        # No DDP: ZeroAdam averages the gradients itself (at stage 2 in buckets, during backward).
        opt = ZeroAdam(
            _param_groups(model), lr=cfg.lr, betas=_BETAS, weight_decay=_WEIGHT_DECAY,
            state_dtype=cfg.state_dtype, stage=cfg.stage, max_grad_norm=_CLIP,
        )
        return model, model, opt, f"ZeroAdam stage {cfg.stage} {cfg.state_dtype}"
    # gradient_as_bucket_view: the gradients live in DDP's buckets, so they are counted once.
    net = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
    )
    fused = _fused_adamw(device)
    opt = torch.optim.AdamW(
        _param_groups(model), lr=cfg.lr, betas=_BETAS, weight_decay=_WEIGHT_DECAY, **({"fused": True} if fused else {})
    )
    return model, net, opt, "DDP + AdamW" + (" (fused)" if fused else "")


def _train(
    kind: str, cfg: DemoConfig, tokens: torch.Tensor, held_out: torch.Tensor, rank: int, world: int, device: torch.device
) -> dict[str, Any]:
    """One run on this rank: ``kind`` "zeroadam" or "ddp"; returns what the report needs (the same on every rank)."""
    size = MODEL_SIZES[cfg.size]
    model, net, opt, name = _setup(kind, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    tqdm = _compat.require("tqdm", "zeroadam demo").tqdm
    bar = tqdm(range(cfg.steps), desc=f"{name:<26}", disable=rank != 0, dynamic_ncols=True, mininterval=0.5)
    losses = torch.zeros(cfg.steps, dtype=torch.float32, device=device)
    warmup = min(3, cfg.steps - 1)  # steps before the clock starts (first-call costs: kernels, buckets, state)
    memory: dict[str, int] = {}
    t0 = time.perf_counter()
    for step in bar:
        if step == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        x, y = (t.to(device) for t in _batch(tokens, size, cfg.seed * 1_000_003 + step, world, rank))
        with autocast:
            logits = net(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), y.reshape(-1))
        loss.backward()
        last = step == cfg.steps - 1
        if kind == "zeroadam":
            if last:
                memory = opt.memory_stats()  # type: ignore[attr-defined]
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), _CLIP)
            if last:
                memory = _ddp_memory(model, opt)
        opt.step()
        if last:
            # Gradients are counted before the step (when they exist), state after it (when it exists).
            after = opt.memory_stats() if kind == "zeroadam" else _ddp_memory(model, opt)  # type: ignore[attr-defined]
            memory = {k: max(v, after[k]) for k, v in memory.items()}
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
        if rank == 0 and (step % 10 == 0 or last):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    seconds = time.perf_counter() - t0
    timed = cfg.steps - warmup
    comm = opt.comm_stats() if kind == "zeroadam" else {}  # type: ignore[attr-defined]
    dist.all_reduce(losses)
    val = _eval(model, held_out, size, world, rank, device, autocast)
    all_memory: list[Any] = [None] * world
    dist.all_gather_object(all_memory, memory)
    return {
        "name": name,
        "losses": (losses / world).tolist(),
        "final_loss": float((losses / world)[-_LAST:].mean()),
        "val_loss": val,
        "tokens_per_s": timed * world * size.batch_per_rank * size.context / seconds if timed > 0 else float("nan"),
        "seconds": seconds,
        "memory": all_memory,
        "comm_bytes_per_step": comm.get("total_bytes"),
    }


@torch.no_grad()
def _eval(model: torch.nn.Module, held_out: torch.Tensor, size: ModelSize, world: int, rank: int,
          device: torch.device, autocast: Any) -> float:
    """Mean loss on fixed windows of the held-out tail of the corpus, over all ranks."""
    total = torch.zeros((), device=device)
    for i in range(_EVAL_BATCHES):
        x, y = (t.to(device) for t in _batch(held_out, size, 7_777_777 + i, world, rank))
        with autocast:
            logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), y.reshape(-1))
    dist.all_reduce(total)
    return float(total) / (_EVAL_BATCHES * world)


def _rank_main(rank: int, cfg: DemoConfig, corpus: bytes, port: int) -> None:
    # torch 2.13 deprecates all_gather_into_tensor, which zeroadam.comm.collectives calls: one FutureWarning per rank
    # between the progress bars tells a demo's reader nothing.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cfg.cuda:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        # Ranks share the cores; more threads than cores per rank only adds contention.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world_size))
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=cfg.world_size, timeout=datetime.timedelta(minutes=5))
    try:
        tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        split = int(tokens.numel() * 0.95)  # the last 5% (the last file or two) is never trained on
        runs = [_train(kind, cfg, tokens[:split], tokens[split:], rank, cfg.world_size, device) for kind in ("zeroadam", "ddp")]
        if rank == 0:
            (cfg.out / ".ranks.json").write_text(json.dumps(runs))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- report
_MEMORY_ROWS = (
    ("params", "param_bytes"),
    ("grads", "grad_bytes"),
    ("optimizer state", "state_bytes"),
    ("master weights", "master_bytes"),
)


def _human(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_table(results: dict[str, Any]) -> str:
    """The comparison printed at the end of the demo: per-rank memory, throughput and losses of both runs."""
    runs = results["runs"]
    rows: list[tuple[str, list[str]]] = []
    for label, key in _MEMORY_ROWS:
        rows.append((label, [_human(r["memory"][0][key]) for r in runs]))
    rows.append(("total", [_human(sum(r["memory"][0][k] for _, k in _MEMORY_ROWS)) for r in runs]))
    rows.append(("", ["" for _ in runs]))
    rows.append(("tokens/s (all ranks)", [f"{r['tokens_per_s']:,.0f}" for r in runs]))
    rows.append((f"train loss (last {_LAST} steps)", [f"{r['final_loss']:.4f}" for r in runs]))
    rows.append(("held-out loss", [f"{r['val_loss']:.4f}" for r in runs]))
    rows.append(("training time", [f"{r['seconds']:.1f} s" for r in runs]))
    width = max(24, *(len(r["name"]) + 2 for r in runs))
    head = f"{'per rank (rank 0)':<30}" + "".join(f"{r['name']:>{width}}" for r in runs)
    lines = [head, "-" * len(head)]
    lines += [f"{label:<30}" + "".join(f"{v:>{width}}" for v in values) for label, values in rows]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Loss curves (left) and rank 0's memory by category (right)."""
    matplotlib = _compat.require("matplotlib", "zeroadam demo")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for r in runs:
        ax_loss.plot(range(1, len(r["losses"]) + 1), r["losses"], lw=1.2, label=f"{r['name']} (held-out {r['val_loss']:.3f})")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats / byte)")
    model = results["model"]
    ax_loss.set_title(
        f"a {model['num_params'] / 1e6:.2f} M-parameter GPT (demo size '{model['size']}') on the CPython stdlib, "
        f"{results['world_size']} ranks",
        fontsize=10,
    )
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    bottoms = [0.0] * len(runs)
    for label, key in _MEMORY_ROWS:
        values = [r["memory"][0][key] / 1024**2 for r in runs]
        ax_mem.bar(range(len(runs)), values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax_mem.set_xticks(range(len(runs)), [r["name"] for r in runs], fontsize=8)
    ax_mem.set_ylim(0, max(bottoms) * 1.4)  # room for the legend above the bars
    ax_mem.set_ylabel("MiB per rank")
    ax_mem.set_title("memory of rank 0")
    ax_mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the command
def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage (default 2)")
    parser.add_argument("--state-dtype", default="int8", choices=get_args(StateDtype), help="moment storage (default int8)")
    parser.add_argument("--world-size", type=int, default=None, help="processes (default: every visible GPU, else 2)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--model-size", default="small", choices=tuple(MODEL_SIZES), help="default small")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out/)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo even when CUDA is present")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(args: argparse.Namespace) -> int:
    import torch.multiprocessing as mp

    for package in ("transformers", "tqdm", "matplotlib"):  # fail before any rank starts
        _compat.require(package, "zeroadam demo")
    cuda = torch.cuda.is_available() and not args.cpu
    world = args.world_size or (torch.cuda.device_count() if cuda else 2)
    if world < 1 or (cuda and world > torch.cuda.device_count()):
        print(f"zeroadam demo: invalid --world-size {world}; expected 1 to {torch.cuda.device_count() if cuda else 'any'}",
              file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"zeroadam demo: invalid --steps {args.steps}; expected at least 1", file=sys.stderr)
        return 2
    cfg = DemoConfig(
        stage=args.stage, state_dtype=args.state_dtype, world_size=world, steps=args.steps, size=args.model_size,
        out=Path(args.out), lr=args.lr, seed=args.seed, cuda=cuda,
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    corpus, files = load_corpus(cfg.corpus_bytes)
    size = MODEL_SIZES[cfg.size]
    num_params = sum(p.numel() for p in build_model(size, cfg.seed).parameters())
    tokens_per_step = world * size.batch_per_rank * size.context
    print(
        f"zeroadam demo: a {num_params / 1e6:.2f} M-parameter GPT ({size.n_layer} layers, d={size.n_embd}, "
        f"context {size.context}; demo size '{cfg.size}') on {world} {'NCCL GPU' if cuda else 'gloo CPU'} ranks, "
        f"{cfg.steps} steps of {tokens_per_step:,} tokens\n"
        f"data: {len(corpus) / 1e6:.1f} MB of the CPython {sys.version_info.major}.{sys.version_info.minor} standard "
        f"library ({len(files)} files, {files[0]} .. {files[-1]}), byte-level; the last 5% held out",
        flush=True,
    )
    # fork shares the already imported transformers with the ranks (importing it costs ~10 s per process on a
    # loaded 2-core machine); CUDA cannot be used after fork, so GPU runs spawn.
    method = "fork" if not cuda and sys.platform.startswith("linux") else "spawn"
    t0 = time.perf_counter()
    try:
        mp.start_processes(_rank_main, args=(cfg, corpus, _free_port()), nprocs=world, start_method=method)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        print(f"zeroadam demo: a rank failed:\n{e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    handoff = cfg.out / ".ranks.json"
    runs = json.loads(handoff.read_text())
    handoff.unlink()
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "world_size": world,
        "backend": "nccl" if cuda else "gloo",
        "model": {"size": cfg.size, **asdict(size), "num_params": num_params, "vocab_size": VOCAB_SIZE},
        "data": {"bytes": len(corpus), "files": files, "python": sys.version.split()[0]},
        "tokens_per_step": tokens_per_step,
        "wall_seconds": wall,
        "runs": runs,
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, cfg.out / "demo.png")
    print()
    print(format_table(results))
    print(f"\nboth runs took {wall:.0f} s; wrote {cfg.out / 'results.json'} and {cfg.out / 'demo.png'}")
    return 0


if __name__ == "__main__":  # python -m zeroadam.tools.demo, the same as `zeroadam demo`
    _parser = argparse.ArgumentParser(prog="zeroadam demo", description=__doc__.split("\n")[0])
    add_demo_arguments(_parser)
    sys.exit(run_demo(_parser.parse_args()))
