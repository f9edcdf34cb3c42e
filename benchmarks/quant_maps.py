"""Which 8-bit code maps should hold Adam's moments? Measured by the AdamW error they cause against fp32.

``zeroadam.formats.quant`` stores exp_avg with a signed power-2 map and exp_avg_sq with an unsigned power-4 map (see its
[Note: code maps]). This study checks that choice against the alternatives by what matters: how far AdamW with
quantized moments drifts from the same AdamW with fp32 moments.

Every candidate runs the fp32 reference update (``zeroadam.adamw_reference``); after each step its moments are
quantized and dequantized with the candidate maps, 256-element blocks with absmax scales, exactly where ZeroAdam
stores and reloads them. Two measurements:

* open loop: the same gradient sequence is fed to every candidate, and the error is the relative L2 distance of
  the parameter change from the fp32 run's, ``|dx_q - dx_fp32| / |dx_fp32|``, at the last step and the worst
  over checkpoints. Sources: gradients recorded while training the char-level GPT of ``benchmarks/charlm.py`` on
  stdlib source (every tensor ZeroAdam would quantize), heavy-tailed synthetic gradients (Student-t noise with
  column scales spread over decades), and sparse embedding-like gradients (Zipf-distributed row activity).
* closed loop: the char-level GPT is trained with the candidate, from the same init and batches (the setup of
  ``tests/test_training.py``); the score is the held-out loss. A run with fp32 moments whose initial weights are
  jittered by 1e-6 (relative) gives the noise floor: how much the final loss moves from a perturbation alone.

Every unsigned map keeps a non-zero v off code 0 (the stored maps' rule, see ``zeroadam.formats.quant``), so the
comparison is between maps, not between that rule and its absence. ``code_maps.dynamic_map`` has 256 (unsigned)
and 255 (signed) entries, so it fits a byte like the others.

Run: ``python benchmarks/quant_maps.py`` (about 1-3 minutes on 2 CPU cores); writes
``benchmarks/results/quant_maps.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import charlm  # benchmarks/charlm.py: the model and data shared with the training tests
import code_maps  # benchmarks/code_maps.py: the candidate maps
import torch

from zeroadam import MIN_QUANT_NUMEL, adamw_reference
from zeroadam.formats import quant
from zeroadam.options import BLOCK_SIZE

ROOT = Path(__file__).resolve().parents[1]

Kind = Literal["signed", "unsigned"]
EVAL_WINDOWS = 128  # as tests/test_training.py
CHOSEN = (quant.M_POWER, quant.V_POWER)


# ----------------------------------------------------------------------------- code maps


@dataclass(frozen=True)
class CodeMap:
    """An 8-bit map of normalized values (|y| <= 1) to codes and back."""

    name: str
    kind: Kind
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]


def linear_map(kind: Kind) -> CodeMap:
    top = 127.0 if kind == "signed" else 255.0

    def enc(y: torch.Tensor) -> torch.Tensor:
        c = torch.round(y * top)
        if kind == "unsigned":
            c = torch.where(y > 0, c.clamp(min=1.0), c)
        return c

    return CodeMap("linear", kind, enc, lambda c: c / top)


def dynamic_tree_map(kind: Kind) -> CodeMap:
    table = code_maps.dynamic_map(kind)
    zero = int(torch.nonzero(table == 0).item())

    def enc(y: torch.Tensor) -> torch.Tensor:
        idx = code_maps.encode_table(y, table)
        if kind == "unsigned":
            idx = torch.where((y > 0) & (idx == zero), idx + 1, idx)
        return idx

    return CodeMap("dynamic", kind, enc, lambda i: code_maps.decode_table(i, table))


def power_map(kind: Kind, power: int) -> CodeMap:
    return CodeMap(
        f"power{power}",
        kind,
        lambda y: code_maps.encode_power(y, kind, power),
        lambda c: code_maps.decode_power(c, kind, power),
    )


def blockwise_roundtrip(x: torch.Tensor, cmap: CodeMap) -> torch.Tensor:
    """Quantize and dequantize a 1D fp32 tensor, 256-element blocks with absmax scales, starting at element 0."""
    n = x.numel()
    pad = (-n) % BLOCK_SIZE
    xb = torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK_SIZE)
    scale = xb.abs().amax(dim=1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = xb / safe
    return (cmap.decode(cmap.encode(y)).to(torch.float32) * scale).view(-1)[:n]


def stored_roundtrip(x: torch.Tensor, kind: Kind) -> torch.Tensor:
    """The production path, ``quant.quantize`` then ``quant.dequantize`` (should equal power (2, 4))."""
    return quant.dequantize(quant.quantize(x.contiguous(), kind), kind)


RoundTrip = Optional[Callable[[torch.Tensor], torch.Tensor]]  # None: the moment stays fp32


@dataclass(frozen=True)
class Candidate:
    name: str
    m: RoundTrip
    v: RoundTrip


def _rt(cmap: CodeMap) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: blockwise_roundtrip(x, cmap)


def candidates() -> list[Candidate]:
    m_maps = [linear_map("signed"), dynamic_tree_map("signed")] + [power_map("signed", p) for p in (2, 3)]
    v_maps = [linear_map("unsigned"), dynamic_tree_map("unsigned")] + [power_map("unsigned", p) for p in (2, 3, 4, 5)]
    out = [FP32]
    # One moment quantized, the other fp32: which moment's map carries the error.
    out += [Candidate(f"m:{c.name} v:fp32", _rt(c), None) for c in m_maps]
    out += [Candidate(f"m:fp32 v:{c.name}", None, _rt(c)) for c in v_maps]
    # Pairs, as they would be stored.
    out.append(Candidate("m:linear v:linear", _rt(m_maps[0]), _rt(v_maps[0])))
    out.append(Candidate("m:dynamic v:dynamic", _rt(m_maps[1]), _rt(v_maps[1])))
    for pm, cm in zip((2, 3), m_maps[2:]):
        for pv, cv in zip((2, 3, 4, 5), v_maps[2:]):
            out.append(Candidate(f"m:power{pm} v:power{pv}", _rt(cm), _rt(cv)))
    out.append(
        Candidate(
            f"chosen (stored, power {CHOSEN[0]}/{CHOSEN[1]})",
            lambda x: stored_roundtrip(x, "signed"),
            lambda x: stored_roundtrip(x, "unsigned"),
        )
    )
    return out


FP32 = Candidate("fp32", None, None)


def is_pair(c: Candidate) -> bool:
    return c.m is not None and c.v is not None


# ----------------------------------------------------------------------------- AdamW with a candidate


BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01


def adamw_step(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, step: int, c: Candidate) -> None:
    """One reference step (``step`` counts from 1), then the moments pass through storage (in place)."""
    adamw_reference(
        x, g, m, v, lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, step=step
    )
    if c.m is not None:
        m.copy_(c.m(m))
    if c.v is not None:
        v.copy_(c.v(v))


# ----------------------------------------------------------------------------- open loop


@dataclass
class GradSource:
    name: str
    description: str
    x0: torch.Tensor  # 1D fp32 [N]; every tensor starts on a block boundary, padding stays 0
    grads: torch.Tensor  # 2D fp32 [steps, N]
    lr_at: Callable[[int], float]  # lr of step t (0-based)


def _block_pad(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK_SIZE))


def heavy_tailed_source(steps: int, seed: int) -> GradSource:
    g = torch.Generator().manual_seed(seed)
    rows, cols = 128, 256
    # Column scales spread over ~4 decades, a persistent per-element mean (so m has a sign to keep) and
    # Student-t noise with 2.5 degrees of freedom (finite mean, infinite-ish variance tails).
    col_scale = torch.exp(torch.randn(cols, generator=g) * 2.0)
    mean = torch.randn(rows, cols, generator=g) * 0.3
    t_dist = torch.distributions.StudentT(torch.tensor(2.5))
    torch.manual_seed(seed)  # StudentT samples from the global generator
    noise = t_dist.sample((steps, rows, cols))
    grads = ((mean + noise) * col_scale).reshape(steps, -1)
    x0 = torch.randn(rows * cols, generator=g) * 0.02
    return GradSource(
        "heavy_tailed",
        f"{rows}x{cols}: (N(0,0.3) mean + Student-t(2.5) noise) * lognormal(0, 2) column scale",
        x0,
        grads.contiguous(),
        lambda t: 1e-3,
    )


def sparse_rows_source(steps: int, seed: int) -> GradSource:
    g = torch.Generator().manual_seed(seed)
    rows, cols = 512, 64
    # Row r is active with probability ~ 1 / (r + 1) (Zipf, like token frequencies): frequent rows every step,
    # rare rows once in hundreds of steps, four rows per 256-element block.
    p_active = (2.0 / torch.arange(1, rows + 1, dtype=torch.float32)).clamp(max=1.0)
    p_active = p_active[torch.randperm(rows, generator=g)]
    active = torch.rand(steps, rows, 1, generator=g) < p_active[None, :, None]
    grads = torch.randn(steps, rows, cols, generator=g) * active
    x0 = torch.randn(rows * cols, generator=g) * 0.02
    return GradSource(
        "sparse_rows",
        f"{rows}x{cols}: N(0,1) rows, row r active with probability min(1, 2/(r+1)), rows shuffled",
        x0,
        grads.reshape(steps, -1).contiguous(),
        lambda t: 1e-3,
    )


def open_loop(src: GradSource, cand: Candidate, checkpoints: list[int], ref: Optional[list[torch.Tensor]]) -> dict:
    x = src.x0.clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    deltas: list[torch.Tensor] = []
    for t in range(src.grads.shape[0]):
        adamw_step(x, src.grads[t], m, v, src.lr_at(t), t + 1, cand)
        if t + 1 in checkpoints:
            deltas.append((x - src.x0).double())
    if ref is None:
        return {"deltas": deltas}
    errs = [float((d - r).norm() / r.norm()) for d, r in zip(deltas, ref)]
    return {"rel_err_final": errs[-1], "rel_err_max": max(errs), "finite": bool(torch.isfinite(x).all())}


# ----------------------------------------------------------------------------- closed loop (char-level GPT)


def train_lm(
    corpus: charlm.Corpus,
    cand: Candidate,
    setup: charlm.TrainSetup,
    *,
    jitter: float = 0.0,
    record: Optional[list[torch.Tensor]] = None,
) -> dict:
    """Train the char-level GPT with the reference update and ``cand``'s storage; held-out and training loss."""
    model = charlm.new_model(setup)
    params = list(model.parameters())
    if jitter:
        g = torch.Generator().manual_seed(12345)
        with torch.no_grad():
            for p in params:
                p.mul_(1.0 + jitter * torch.randn(p.shape, generator=g))
    quantized = [p.numel() >= MIN_QUANT_NUMEL for p in params]  # ZeroAdam keeps small tensors in fp32
    moments = [(torch.zeros(p.numel()), torch.zeros(p.numel())) for p in params]
    step_no = 0

    @torch.no_grad()
    def step(lr: float) -> None:
        nonlocal step_no
        step_no += 1
        for p, q, (m, v) in zip(params, quantized, moments):
            adamw_step(p.data.view(-1), p.grad.view(-1), m, v, lr, step_no, cand if q else FP32)
            p.grad = None

    def on_grads(_: int) -> None:
        if record is not None:
            record.append(torch.cat([_block_pad(p.grad) for p, q in zip(params, quantized) if q]))

    losses = charlm.train(model, step, corpus.train, setup, on_grads=on_grads)
    return {
        "eval_loss": charlm.eval_loss(model, corpus.val, windows=EVAL_WINDOWS),
        "train_loss_last10": sum(losses[-10:]) / 10,
        "train_loss_first": losses[0],
    }


def quantized_init(setup: charlm.TrainSetup) -> tuple[torch.Tensor, list[str]]:
    """The initial values of the tensors ZeroAdam quantizes, block-padded and concatenated, and their names."""
    named = [(n, p) for n, p in charlm.new_model(setup).named_parameters() if p.numel() >= MIN_QUANT_NUMEL]
    return torch.cat([_block_pad(p.detach()) for _, p in named]), [n for n, _ in named]


# ----------------------------------------------------------------------------- main


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-30)) for x in xs) / len(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="AdamW steps per run (open and closed loop)")
    ap.add_argument("--closed-extra", type=int, default=1, help="best other power pairs to train besides the chosen one")
    # One thread: the tensors here are small (<= 100k elements), and on a shared 2-core machine two intra-op
    # threads made the model's steps 3-7x slower than one (measured under a load average of 7).
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quant_maps.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f}s] {what}", file=sys.stderr, flush=True)

    setup = charlm.TrainSetup(steps=args.steps)
    steps = setup.steps
    checkpoints = sorted({min(steps, c) for c in (10, 25, 50, 100, steps // 2, steps)})
    corpus = charlm.load_corpus()

    # The fp32 training run doubles as the recording of real gradients for the open loop.
    recorded: list[torch.Tensor] = []
    closed: dict[str, dict] = {"fp32": train_lm(corpus, FP32, setup, record=recorded)}
    progress("fp32 training run recorded")
    x0, quantized_tensors = quantized_init(setup)
    sources = [
        GradSource(
            "charlm",
            "gradients recorded from the char-level GPT (benchmarks/charlm.py) on stdlib source during the fp32 run; "
            f"the {len(quantized_tensors)} tensors ZeroAdam quantizes; warmup + cosine lr as in training",
            x0,
            torch.stack(recorded),
            setup.lr_at,
        ),
        heavy_tailed_source(steps, seed=2),
        sparse_rows_source(steps, seed=3),
    ]
    del recorded

    cands = candidates()
    names = [c.name for c in cands if c is not FP32]
    open_res: dict[str, dict[str, dict]] = {}
    for src in sources:
        ref = open_loop(src, FP32, checkpoints, None)["deltas"]
        open_res[src.name] = {c.name: open_loop(src, c, checkpoints, ref) for c in cands if c is not FP32}
        progress(f"open loop {src.name}")
    t_open = time.perf_counter() - t_start

    def geo(n: str) -> float:
        return geomean([open_res[s.name][n]["rel_err_final"] for s in sources])

    # Closed loop: the noise floor, the baselines, the chosen pair, and the best other power pairs (open loop).
    chosen = f"m:power{CHOSEN[0]} v:power{CHOSEN[1]}"
    pair_names = [c.name for c in cands if is_pair(c) and not c.name.startswith("chosen")]
    ranked = sorted(pair_names, key=geo)
    others = [n for n in ranked if n.startswith("m:power") and n != chosen]
    by_name = {c.name: c for c in cands}
    closed["fp32 (init jitter 1e-6)"] = train_lm(corpus, FP32, setup, jitter=1e-6)
    for n in ["m:linear v:linear", "m:dynamic v:dynamic", chosen] + others[: args.closed_extra]:
        closed[n] = train_lm(corpus, by_name[n], setup)
        progress(f"closed loop {n}")
    base = closed["fp32"]["eval_loss"]
    for r in closed.values():
        r["eval_vs_fp32_pct"] = 100.0 * (r["eval_loss"] - base) / base

    # ---- report
    w = max(len(n) for n in names) + 2
    print("open loop: relative L2 error of the parameter change vs fp32 at the last step (worst checkpoint)")
    print(f"{'candidate':<{w}}" + "".join(f"{s.name:>24}" for s in sources) + f"{'geomean':>11}")
    for n in names:
        cells = "".join(
            f"{open_res[s.name][n]['rel_err_final']:>13.2e} ({open_res[s.name][n]['rel_err_max']:.2e})" for s in sources
        )
        print(f"{n:<{w}}{cells}{geo(n):>11.2e}")
    print()
    print(
        f"closed loop: char-level GPT, {steps} steps, batch {setup.batch_size}x{charlm.GPTConfig().context}, "
        f"peak lr {setup.peak_lr} (warmup {setup.warmup}, cosine); held-out loss"
    )
    for n, r in closed.items():
        print(
            f"{n:<{w}}eval {r['eval_loss']:.4f} ({r['eval_vs_fp32_pct']:+.3f}% vs fp32)   "
            f"train(last 10) {r['train_loss_last10']:.4f}"
        )

    stored = next(c.name for c in cands if c.name.startswith("chosen"))
    stored_diff = max(
        abs(open_res[s.name][stored]["rel_err_final"] / open_res[s.name][chosen]["rel_err_final"] - 1) for s in sources
    )
    trained = [n for n in closed if n.startswith("m:")]
    summary = {
        "best_pair_open_loop": ranked[0],
        "ranking_open_loop_geomean": [[n, geo(n)] for n in ranked],
        "best_pair_per_source": {s.name: min(pair_names, key=lambda n: open_res[s.name][n]["rel_err_final"]) for s in sources},
        "chosen": chosen,
        "chosen_rank_open_loop": ranked.index(chosen) + 1,
        "chosen_vs_best_geomean_ratio": geo(chosen) / geo(ranked[0]),
        "stored_path_vs_power_pair_max_rel_diff": stored_diff,
        "best_closed_loop": min(trained, key=lambda n: closed[n]["eval_loss"]),
        "closed_loop_noise_floor_pct": abs(closed["fp32 (init jitter 1e-6)"]["eval_vs_fp32_pct"]),
    }
    print()
    print(f"best pair, open loop (geomean over sources): {ranked[0]} {geo(ranked[0]):.2e}; per source: "
          + ", ".join(f"{k}: {v}" for k, v in summary["best_pair_per_source"].items()))
    print(
        f"chosen {chosen}: rank {summary['chosen_rank_open_loop']} of {len(ranked)}, "
        f"{summary['chosen_vs_best_geomean_ratio']:.2f}x the best geomean error; "
        f"stored path (quant.quantize) within {100 * stored_diff:.2f}% of it"
    )
    print(f"best closed loop: {summary['best_closed_loop']}")

    runtime = {
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - cpu_start,
        "open_loop_done_at_s": t_open,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    result = {
        "setup": {
            "steps": steps,
            "checkpoints": checkpoints,
            "block_size": BLOCK_SIZE,
            "min_quant_numel": MIN_QUANT_NUMEL,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": WEIGHT_DECAY,
            "lm": {**dataclasses.asdict(setup), "context": charlm.GPTConfig().context, "files": corpus.files,
                   "train_chars": corpus.train.numel(), "val_chars": corpus.val.numel(), "eval_windows": EVAL_WINDOWS},
            "sources": {s.name: {"description": s.description, "numel": s.x0.numel()} for s in sources},
            "quantized_tensors": quantized_tensors,
            "dynamic_map_entries": {k: code_maps.dynamic_map(k).numel() for k in ("signed", "unsigned")},
            "unsigned_floor": "every unsigned map keeps v > 0 off code 0",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "open_loop": open_res,
        "open_loop_geomean": {n: geo(n) for n in names},
        "closed_loop": closed,
        "summary": summary,
        "runtime": runtime,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wall {runtime['wall_s']:.0f}s, cpu {runtime['cpu_s']:.0f}s "
          f"(load average {runtime['load_average_1min_at_end']:.1f}); wrote {args.out}")


if __name__ == "__main__":
    main()
