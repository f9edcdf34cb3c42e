"""Spawn gloo ranks on loopback for tests: each rank runs a top-level function, results come back in order."""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any, pg_timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world, *args)
        # Tensors go by value: shared-memory handles die with this process.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0, pg_timeout: float = 60.0) -> list[Any]:
    """Run fn(rank, world, *args) on `world` spawned gloo ranks; returns the results by rank.

    Raises RuntimeError with every failing rank's traceback; a rank that does not finish within `timeout`
    seconds fails the call (no test hangs). ``pg_timeout``: the process group's own timeout, after which a rank
    blocked in a collective gets an error (short for tests where one rank is expected to wait in vain).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, pg_timeout), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as _q

    try:
        for _ in range(world):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except _q.Empty:
                raise RuntimeError(f"ranks did not finish within {timeout} s (got {sorted(results)})") from None
            (results if status == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(f"rank {r}:\n{msg}" for r, msg in sorted(errors.items())))
    import torch

    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world)]


_ONCE: dict[tuple[str, str, int], list[Any]] = {}


def ranks_once(fn: Callable[..., Any], world: int, timeout: float = 600.0) -> list[Any]:
    """``run_ranks(fn, world)`` once per (fn, world) in this pytest process: a module's tests read one launch's
    results."""
    key = (fn.__module__, fn.__qualname__, world)
    if key not in _ONCE:
        _ONCE[key] = run_ranks(fn, world, timeout=timeout)
    return _ONCE[key]


def run_two_nodes(script: str, args: list[str], nproc_per_node: int = 2, timeout: float = 240.0) -> None:
    """Launch ``script`` as two "machines" on loopback: two ``torchrun --nnodes 2 --node_rank 0|1`` processes with
    ``nproc_per_node`` ranks each (gloo; ranks 0..n-1 on node 0). The script writes its results to files; a
    launch that fails or runs past ``timeout`` seconds raises with both launchers' output."""
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        argv = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
            "--nproc_per_node", str(nproc_per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
            script, *args,
        ]
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        )
    outputs, failed = [], False
    for node, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal

            for q in procs:  # the launcher and its ranks: each launch is a session of its own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, signal.SIGKILL)
            out, _ = p.communicate()
            failed = True
        outputs.append(f"--- node {node} (exit {p.returncode}):\n{out[-6000:]}")
        failed = failed or p.returncode != 0
    if failed:
        raise RuntimeError("two-node launch failed:\n" + "\n".join(outputs))
