"""What 16-bit gradient shards (``grad_dtype="bf16"``) and ``release_grads=True`` cost in convergence.

The char-level GPT of ``benchmarks/charlm.py`` (CPython stdlib source) is trained on 2 gloo ranks with bf16
parameters, int8 moments and compact masters (ZeroAdam's defaults for a bf16 model), from the same init and the
same global batches (16 windows per step, split over the ranks and over the accumulation micro-batches). Each run
changes one thing against the fp32-gradient run of the same stage and accumulation: the gradient shard's dtype,
or releasing gradients inside backward. The score is the held-out loss after the last step (fp32 evaluation of
the gathered weights); a run whose initial weights are jittered by 1e-6 (relative) gives the noise floor.

Micro-batches are accumulated as most loops do at stages 2-3: every backward reduces into the gradient shard
(no ``no_sync()``), so with accumulation 8 a bf16 shard receives 8 rounded additions per step. ``release_grads``
runs accumulate the micro-batches before the last under ``no_sync()`` (their gradients add up in ``p.grad``), as
it requires.

Run: ``python benchmarks/grad_memory.py`` (a few minutes on 2 CPU cores); writes
``benchmarks/results/grad_memory.json`` and ``grad_memory.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import charlm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import RESULTS_DIR, describe_machine, write_json

WORLD = 2
GLOBAL_BATCH = 16


@dataclass(frozen=True)
class RunSpec:
    name: str
    stage: int
    accum: int
    grad_dtype: str = "fp32"
    release_grads: bool = False
    jitter: float = 0.0  # relative perturbation of the initial weights: the noise floor


def specs(steps: int) -> list[RunSpec]:
    out = []
    for stage in (2, 3):
        for accum in (1, 8):
            out.append(RunSpec(f"s{stage} a{accum} fp32", stage, accum))
            out.append(RunSpec(f"s{stage} a{accum} bf16", stage, accum, grad_dtype="bf16"))
            if stage == 3:
                out.append(RunSpec(f"s{stage} a{accum} release", stage, accum, release_grads=True))
    out.append(RunSpec("s3 a1 release bf16", 3, 1, grad_dtype="bf16", release_grads=True))
    out.append(RunSpec("s2 a1 fp32 jitter", 2, 1, jitter=1e-6))
    out.append(RunSpec("s3 a1 fp32 jitter", 3, 1, jitter=1e-6))
    return out


def _train(rank: int, spec: RunSpec, setup: charlm.TrainSetup, corpus: charlm.Corpus) -> dict[str, Any]:
    import zeroadam
    from zeroadam import ZeroAdam

    model = charlm.new_model(setup)
    if spec.jitter:
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + spec.jitter * torch.randn(p.shape, generator=g))
    model = model.to(torch.bfloat16)
    if spec.stage == 3:
        model = zeroadam.shard_model(model)
    kwargs = dict(grad_dtype=spec.grad_dtype)
    if spec.release_grads:
        kwargs["release_grads"] = True
    opt = ZeroAdam(model.parameters(), lr=setup.peak_lr, weight_decay=setup.weight_decay, stage=spec.stage, **kwargs)
    per = GLOBAL_BATCH // WORLD
    micro = per // spec.accum
    stream = charlm.batches(corpus.train, steps=setup.steps, batch_size=GLOBAL_BATCH, context=model.cfg.context,
                            seed=setup.data_seed)
    losses = []
    peak_grad = 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(stream):
        for group in opt.param_groups:
            group["lr"] = setup.lr_at(i)
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        total = 0.0
        for k in range(spec.accum):
            # release_grads updates at every backward outside no_sync(): the micro-batches before the last go inside.
            last = k == spec.accum - 1
            with contextlib.nullcontext() if last or not spec.release_grads else opt.no_sync():
                loss = model(xs[k * micro:(k + 1) * micro], ys[k * micro:(k + 1) * micro]) / spec.accum
                loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        peak_grad = max(peak_grad, opt.memory_stats().get("peak_grad_bytes", 0))
        losses.append(total)
    seconds = time.perf_counter() - t0
    full = zeroadam.full_state_dict(model) if spec.stage == 3 else model.state_dict()
    if rank != 0:
        return {}
    ref = charlm.new_model(setup)
    ref.load_state_dict({k: v.float() for k, v in full.items()})
    ref.eval()
    return {
        "spec": asdict(spec),
        "train_loss": losses,
        "held_out_loss": charlm.eval_loss(ref, corpus.val, windows=128),
        "seconds": seconds,
        "peak_grad_bytes": peak_grad,
    }


def _rank(rank: int, port: int, spec_list: list[RunSpec], steps: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    setup = charlm.TrainSetup(steps=steps)
    corpus = charlm.load_corpus()
    for spec in spec_list:
        out = _train(rank, spec, setup, corpus)
        if rank == 0:
            queue.put(out)
            print(f"{spec.name:28s} held-out {out['held_out_loss']:.4f}  {out['seconds']:.0f} s", flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", default="", help="comma-separated substrings of run names to keep")
    ap.add_argument("--out", default="grad_memory")
    args = ap.parse_args(argv)
    spec_list = [s for s in specs(args.steps) if not args.only or any(o in s.name for o in args.only.split(","))]
    return _run(spec_list, args)


def _run(spec_list: list[RunSpec], args: argparse.Namespace) -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, spec_list, args.steps, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    runs = [queue.get() for _ in spec_list]
    for p in procs:
        p.join()
    by_key = {r["spec"]["name"]: r for r in runs}
    for r in runs:
        s = r["spec"]
        base = by_key.get(f"s{s['stage']} a{s['accum']} fp32")
        if base is not None:
            r["relative_to_fp32"] = r["held_out_loss"] / base["held_out_loss"] - 1
    write_json(f"{args.out}.json", {"machine": describe_machine(), "world": WORLD, "global_batch": GLOBAL_BATCH,
                                    "steps": args.steps, "runs": runs})
    _plot(runs, RESULTS_DIR / f"{args.out}.png")
    for r in runs:
        rel = r.get("relative_to_fp32")
        print(f"{r['spec']['name']:28s} {r['held_out_loss']:.4f}" + ("" if rel is None else f"  {100 * rel:+.2f}%"))
    return 0


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        loss = torch.tensor(r["train_loss"])
        k = 10
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], k, 1)[0, 0] if loss.numel() >= k else loss
        ax1.plot(range(k - 1, k - 1 + smooth.numel()), smooth.tolist(), label=r["spec"]["name"], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (10-step mean, rank 0)")
    ax1.legend(fontsize=7)
    names = [r["spec"]["name"] for r in runs]
    ax2.barh(names, [r["held_out_loss"] for r in runs])
    lo = min(r["held_out_loss"] for r in runs)
    ax2.set_xlim(lo * 0.98, max(r["held_out_loss"] for r in runs) * 1.01)
    ax2.set_xlabel("held-out loss after the last step")
    ax2.tick_params(axis="y", labelsize=7)
    fig.suptitle("char-GPT, bf16 parameters, int8 moments, 2 gloo ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
