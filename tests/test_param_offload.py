"""ZeRO-3 parameter offload: shard_model(offload_params=True) with ZeroAdam(stage=3, offload="cpu").

On CPU, CPU tensors stand in for the device as the optimizer offload is tested (tests/test_offload.py): the host
shard is copied into a staging shard before every all-gather and the reduced gradients go through the host
gradient sink, so the whole path runs; only the streams and pinned memory need a GPU (the CUDA tests at the end).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import zeroadam
from distributed import run_ranks
from helpers import rel_err
from test_zero3 import BATCH, CLIP, MICRO, STEPS, data, groups, loss_of, make, reference, train, whole_params
from zeroadam import ZeroAdam, checkpoint
from zeroadam.sharding.model import load_full_state_dict


def _host_side(model: nn.Module) -> dict:
    """What the device holds of the model's parameters and gradients between steps (CPU stands in for it)."""
    st = model._zeroadam_sharded
    flats = [f for u in st.units for f in u.flats]
    return {
        "offloaded": all(f.offloaded for f in flats),
        "gathered": sum(f.is_materialized() for f in flats),
        "staged": sum(len(u.staged) for u in st.units),
        "grad_full": sum(f.grad_full is not None for f in flats),
        "live_bytes": st.live_bytes,
    }


def _count_gather_sources() -> list[str]:
    """Record, for every all-gather of a unit, whether its input was the persistent shard or a staging copy."""
    from zeroadam.sharding import model as sharding

    seen: list[str] = []
    gather = sharding.all_gather_into

    def counted(group, full, shard, stats):  # type: ignore[no-untyped-def]
        persistent = any(shard is f.shard for st in _live_models for u in st.units for f in u.flats)
        seen.append("shard" if persistent else "staging")
        return gather(group, full, shard, stats)

    sharding.all_gather_into = counted
    return seen


_live_models: list = []  # ShardedModels of this rank, for _count_gather_sources


def equality(rank: int, world: int) -> dict:
    out: dict = {}
    sources = _count_gather_sources()
    for fmt in ("fp32", "int8"):
        runs = {}
        for name, shard_opts, opt_opts in (
            ("plain", {}, {}),
            ("offload", {}, {"offload": "cpu"}),
            ("params", {"offload_params": True}, {"offload": "cpu"}),
        ):
            model = zeroadam.shard_model(make(), **shard_opts)
            _live_models[:] = [model._zeroadam_sharded]
            sources.clear()
            opt = train(model, rank, world, state_dtype=fmt, **opt_opts)
            out[fmt, name, "gathered_from"] = sorted(set(sources))
            if name == "params":
                out[fmt, "host_side"] = _host_side(model)
                out[fmt, "stats"] = opt.memory_stats()
                out[fmt, "pieces_on_host"] = all(
                    pc.param_view().device.type == "cpu" and pc.param_host is None for pc in opt.engine.pieces
                )
            runs[name] = whole_params(model)
        out[fmt] = runs
    # Gradient accumulation under no_sync: gradients stay whole in p.grad until the last micro-batch.
    model = zeroadam.shard_model(make(), offload_params=True)
    train(model, rank, world, no_sync=True, offload="cpu")
    out["no_sync"] = whole_params(model)
    # prefetch=0 and reshard_after_forward=False: other gather schedules, the same numbers.
    model = zeroadam.shard_model(make(), offload_params=True, prefetch=0, reshard_after_forward=False)
    train(model, rank, world, offload="cpu")
    out["schedule"] = whole_params(model)
    return out


@pytest.fixture(scope="module")
def ref() -> list[torch.Tensor]:
    return reference()


@pytest.mark.parametrize("world", [2, 3])
def test_offloaded_parameters_train_like_resident_ones(world: int, ref: list[torch.Tensor]) -> None:
    for res in run_ranks(equality, world):
        for fmt in ("fp32", "int8"):
            runs = res[fmt]
            # The host shards receive exactly what the device shards would: same kernels, same order.
            assert max(rel_err(a, b) for a, b in zip(runs["params"], runs["offload"])) <= 1e-6, fmt
            assert max(rel_err(a, b) for a, b in zip(runs["params"], runs["plain"])) <= 1e-6, fmt
            # Every gather of an offloaded unit reads a staging copy of the host shard, never the shard itself.
            assert res[fmt, "params", "gathered_from"] == ["staging"]
            assert res[fmt, "plain", "gathered_from"] == ["shard"]
            side = res[fmt, "host_side"]
            assert side == {"offloaded": True, "gathered": 0, "staged": 0, "grad_full": 0, "live_bytes": 0}, side
            assert res[fmt, "pieces_on_host"]
            stats = res[fmt, "stats"]
            assert stats["device_bytes"] == 0, stats  # nothing of the parameters, gradients or state between steps
            assert stats["host_bytes"] >= stats["param_bytes"] + stats["state_bytes"] + stats["master_bytes"]
        assert max(rel_err(a, b) for a, b in zip(res["fp32"]["params"], ref)) <= 1e-5
        assert max(rel_err(a, b) for a, b in zip(res["no_sync"], ref)) <= 1e-5
        assert max(rel_err(a, b) for a, b in zip(res["schedule"], res["fp32"]["params"])) <= 1e-6


def checkpoints(rank: int, world: int, root: str) -> dict:
    """Save after 5 steps, train 5 more; load into fresh models (offloaded, and not) and train the same 5."""
    from pathlib import Path

    out: dict = {}
    per = BATCH // world
    steps = data(10, MICRO)

    def run(model: nn.Module, opt: ZeroAdam, batches: list) -> None:
        for mbs in batches:
            opt.zero_grad()
            for x, y in mbs:
                (loss_of(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]) / MICRO).backward()
            opt.step()

    def build(offload_params: bool) -> tuple[nn.Module, ZeroAdam]:
        model = zeroadam.shard_model(make(), offload_params=offload_params)
        opts = {"offload": "cpu"} if offload_params else {}
        return model, ZeroAdam(groups(model), lr=1e-2, state_dtype="int8", stage=3, max_grad_norm=CLIP, **opts)

    model, opt = build(True)
    run(model, opt, steps[:5])
    checkpoint.save(Path(root) / "ck", model, opt)
    sd = opt.state_dict()  # the optimizer's own state dict: whole on rank 0
    run(model, opt, steps[5:])
    out["continued"] = whole_params(model)
    for offload_params in (True, False):
        m2, o2 = build(offload_params)
        checkpoint.load(Path(root) / "ck", m2, o2)
        run(m2, o2, steps[5:])
        out["resumed", offload_params] = whole_params(m2)
    # The model's state dict routes: full_state_dict / load_full_state_dict / state_dict_views.
    m3, o3 = build(True)
    full = zeroadam.full_state_dict(model)
    load_full_state_dict(m3, full)
    out["full_round_trip"] = all(torch.equal(full[k], v) for k, v in zeroadam.full_state_dict(m3).items())
    with m3._zeroadam_sharded.state_dict_views():
        out["views"] = sorted(m3.state_dict()) == sorted(full)
    out["state_dict_keys"] = sorted(sd["state"]) if rank == 0 else None
    # One rank offloading and the other not is refused on both, before any gather.
    try:
        zeroadam.shard_model(make(), offload_params=rank == 0)
        out["disagree"] = None
    except ValueError as e:
        out["disagree"] = str(e)
    return out


def test_checkpoint_round_trip_resumes_the_same(tmp_path) -> None:  # noqa: ANN001
    results = run_ranks(checkpoints, 2, str(tmp_path))
    for res in results:
        for offload_params in (True, False):
            for a, b in zip(res["resumed", offload_params], res["continued"]):
                assert torch.equal(a, b), offload_params
        assert res["full_round_trip"] and res["views"]
    assert results[0]["state_dict_keys"] == list(range(len(list(make().parameters()))))
    for res in results:
        assert "offload_params" in res["disagree"] and "ranks disagree" in res["disagree"]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="offload_params='yes'"):
        zeroadam.shard_model(make(), offload_params="yes")  # type: ignore[arg-type]
    model = zeroadam.shard_model(make(), offload_params=True)
    with pytest.raises(ValueError, match='offload=None.*offload_params=True.*offload="cpu"'):
        ZeroAdam(model.parameters(), stage=3)
    # Stages 1-2 know nothing of shard_model's shards: the parameters of a sharded model need stage=3.
    with pytest.raises(ValueError, match="stage=3"):
        ZeroAdam(model.parameters(), stage=2, offload="cpu")


def test_single_process_matches_adamw(ref: list[torch.Tensor]) -> None:
    """One process (no collectives): the host shard is copied straight into the full buffer."""
    import torch.distributed as dist

    model = zeroadam.shard_model(make(), offload_params=True)
    stats = train(model, 0, 1, offload="cpu").memory_stats()
    assert max(rel_err(a, b) for a, b in zip(whole_params(model), ref)) <= 1e-5
    assert not dist.is_initialized()
    assert stats["device_bytes"] == 0
    assert stats["host_bytes"] == sum(stats[k] for k in ("param_bytes", "grad_bytes", "state_bytes", "master_bytes"))
    # The device / host split of the other placements: everything on the device, or the optimizer state on the host.
    for opts, on_host in (({}, ()), ({"offload": "cpu"}, ("state_bytes", "master_bytes"))):
        stats = train(zeroadam.shard_model(make()), 0, 1, **opts).memory_stats()
        categories = ("param_bytes", "grad_bytes", "state_bytes", "master_bytes")
        assert stats["host_bytes"] == sum(stats[k] for k in on_host)
        assert stats["device_bytes"] == sum(stats[k] for k in categories if k not in on_host)


def test_next_unit_is_copied_in_while_one_computes() -> None:
    """The prefetch starts the next unit's host-to-device copy before the unit in use computes (on CUDA the two
    then overlap; the timeline is measured by the CUDA test below)."""
    model = zeroadam.shard_model(make(), offload_params=True)
    st = model._zeroadam_sharded
    blocks = [u for u in st.units if u is not st.root]
    in_flight: list[tuple[str, bool, bool]] = []

    def started(nxt) -> tuple[str, bool, bool]:  # type: ignore[no-untyped-def]
        return nxt.name, nxt.gathered, all(f.is_materialized() for f in nxt.flats)

    for u, nxt in zip(blocks, blocks[1:]):
        u.module.register_forward_pre_hook(lambda m, a, nxt=nxt: in_flight.append(started(nxt)))
    x = data(1, 1)[0][0][0]
    with torch.no_grad():
        model(x)  # records the order that prefetching follows
        in_flight.clear()
        model(x)
    # Started (its full buffer allocated, the copy issued) but not yet waited for.
    assert in_flight == [(u.name, False, True) for u in blocks[1:]], in_flight


def test_meta_device_model_is_materialized_into_host_shards() -> None:
    from test_zero3 import TinyLM

    with torch.device("meta"):
        meta = TinyLM()
    model = zeroadam.shard_model(meta, device="cpu", full_state_dict=make().state_dict(), offload_params=True)
    assert all(f.offloaded and not f.is_materialized() for u in model._zeroadam_sharded.units for f in u.flats)
    x = data(1, 1)[0][0][0]
    with torch.no_grad():
        assert torch.equal(model(x), make()(x))


def test_accelerate_shard_model_offloads_and_trains_like_adamw(ref: list[torch.Tensor]) -> None:
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from zeroadam.integrations.accelerate import ZeroAccelerator

    acc = ZeroAccelerator()
    model = acc.shard_model(make(), offload_params=True)
    assert model._zeroadam_sharded.offload_params
    opt = ZeroAdam(groups(model), lr=1e-2, state_dtype="fp32", stage=3, max_grad_norm=CLIP, offload="cpu")
    model, opt = acc.prepare(model, opt)
    for mbs in data(STEPS, MICRO):
        opt.zero_grad()
        for x, y in mbs:
            acc.backward(loss_of(model, x, y) / MICRO)
        opt.step()
    assert max(rel_err(a, b) for a, b in zip(whole_params(model), ref)) <= 1e-5


# ---------------------------------------------------------------------------------------------- DeepSpeed configs
def deepspeed_offload_param(rank: int, world: int) -> dict:
    """HF's ZeRO-3 offload config shape (offload_optimizer and offload_param on the cpu, pinned) through zds."""
    import os
    import warnings

    os.environ["LOCAL_RANK"] = str(rank)
    from test_integration_deepspeed import _train, config

    from zeroadam.integrations import deepspeed as zds

    warnings.filterwarnings("ignore", category=FutureWarning)
    both = {"device": "cpu", "pin_memory": True}
    out = {"offload": _train(rank, zds.initialize, config({"stage": 3, "offload_optimizer": both, "offload_param": both}))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = zds.translate(config({"stage": 3, "offload_optimizer": both, "cpu_offload_param": True}))
    out["legacy"] = (t.offload_params, [str(w.message) for w in caught])
    # A model the caller sharded must agree with the config.
    try:
        zds.initialize(model=zeroadam.shard_model(_small()), config=config({"stage": 3, "offload_optimizer": both, "offload_param": both}))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def _small() -> nn.Module:
    from helpers import make_model

    return make_model()


def test_deepspeed_offload_param_config_trains_like_adamw() -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    from helpers import max_rel_err
    from test_integration_deepspeed import reference as ds_reference

    ref = ds_reference()
    for r in run_ranks(deepspeed_offload_param, 2, timeout=600):
        res = r["offload"]
        assert max_rel_err(res["params"], ref) <= 1e-5
        assert res["optimizer"] == "ZeroAdam" and res["ds_allreduces"] == 0
        assert res["sharded"]["released"] and res["sharded"]["grads_left"] == 0
        assert r["legacy"][0] and any("cpu_offload_param is deprecated" in m for m in r["legacy"][1])
        assert "offload_params=False" in r["mismatch"]


def test_deepspeed_offload_param_refusals() -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    from zeroadam.integrations import deepspeed as zds

    cpu = {"device": "cpu"}

    def refusal(zero: dict) -> str:
        with pytest.raises(ValueError) as e:
            zds.translate({"zero_optimization": zero})
        return str(e.value)

    msg = refusal({"stage": 3, "offload_optimizer": cpu, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}})
    assert "zero_optimization.offload_param.device='nvme'" in msg and "'cpu' only" in msg
    msg = refusal({"stage": 3, "offload_param": cpu})
    assert "zero_optimization.offload_param.device='cpu'" in msg and "offload_optimizer: {'device': 'cpu'}" in msg
    msg = refusal({"stage": 2, "offload_optimizer": cpu, "offload_param": cpu})
    assert "stage 3" in msg
    assert "offload_param.speed" in refusal({"stage": 3, "offload_optimizer": cpu, "offload_param": {"device": "cpu", "speed": 1}})
    t = zds.translate({"zero_optimization": {"stage": 3, "offload_optimizer": cpu, "offload_param": {"device": "none"}}})
    assert not t.offload_params


# ---------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_model(width: int = 1024, blocks: int = 6) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers).cuda()


@contextlib.contextmanager
def _one_rank_group():  # noqa: ANN202
    import os

    import torch.distributed as dist

    from distributed import free_port

    if dist.is_initialized():
        yield
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@cuda
def test_cuda_shards_are_pinned_and_the_device_holds_no_parameter_bytes_between_steps() -> None:
    with _one_rank_group():
        ref = _cuda_model()
        model = zeroadam.shard_model(copy.deepcopy(ref), units=[nn.Linear], offload_params=True)
        opt = ZeroAdam(model.parameters(), lr=1e-3, weight_decay=0.01, state_dtype="fp32", stage=3, offload="cpu")
        adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
        st = model._zeroadam_sharded
        for f in (f for u in st.units for f in u.flats):
            assert f.shard.device.type == "cpu" and f.shard.is_pinned()
            assert f.device.type == "cuda"
        for s in range(3):
            x = torch.randn(64, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(s))
            for m, o in ((model, opt), (ref, adamw)):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()
            torch.cuda.synchronize()
            for f in (f for u in st.units for f in u.flats):
                assert not f.is_materialized() and f.grad_full is None
                assert f.grad_shard is not None and f.grad_shard.device.type == "cpu" and f.grad_shard.is_pinned()
            assert opt.memory_stats()["device_bytes"] == 0
        full = zeroadam.full_state_dict(model)
        assert max(rel_err(full[n], p.cpu()) for n, p in ref.named_parameters()) <= 1e-5


@cuda
def test_cuda_prefetch_copy_overlaps_compute() -> None:
    """The profiler's timeline: host-to-device copies of the prefetched units run while the compute stream runs
    the unit in use."""
    from torch.profiler import ProfilerActivity, profile

    with _one_rank_group():
        width = 4096
        model = zeroadam.shard_model(_cuda_model(width, 8), units=[nn.Linear], offload_params=True, prefetch=1)
        opt = ZeroAdam(model.parameters(), lr=1e-3, stage=3, offload="cpu")
        x = torch.randn(8192, width, device="cuda")
        for _ in range(2):  # the first forward records the order that prefetching follows
            with torch.no_grad():
                model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with torch.no_grad():
                model(x)
            torch.cuda.synchronize()
        copies, kernels = [], []
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            span = (e.time_range.start, e.time_range.end)
            if "Memcpy HtoD" in e.name:
                copies.append(span)
            elif "gemm" in e.name.lower() or "cutlass" in e.name.lower() or "sm90" in e.name.lower():
                kernels.append(span)
        assert copies and kernels, (len(copies), len(kernels))
        overlapped = sum(
            max(0, min(c1, k1) - max(c0, k0)) for c0, c1 in copies for k0, k1 in kernels
        )
        copy_time = sum(c1 - c0 for c0, c1 in copies)
        print(f"host-to-device copy time {copy_time} us, of which under compute {overlapped} us")
        assert overlapped >= 0.5 * copy_time, (overlapped, copy_time)
        del opt
