"""FSDP2 (fully_shard) DTensor parameters with ZeroAdam(stage=0) on 2 gloo CPU processes: training like
torch.optim.AdamW, int8 state equal to one process's (blocks across shard cuts), and torch.distributed.checkpoint
save / load, also into a single process."""
from __future__ import annotations

import tempfile
import warnings

import pytest
import torch

from distributed import run_ranks
from helpers import max_rel_err
from zeroadam import GradScaler, ZeroAdam

WORLD, GLOBAL_BATCH, STEPS, SAVE_AT, CLIP, SKIP = 2, 12, 5, 3, 0.5, 2
HYPER = dict(lr=1e-2, weight_decay=0.1, max_grad_norm=CLIP)


def make_three_layer_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    # 97*67 = 6499 and 61*97 = 5917 elements (int8 state); FSDP2 cuts them after 49*67 = 3283 and 31*97 = 3007
    # elements, inside a 256-element block. 13*61 = 793 keeps fp32 state.
    return torch.nn.Sequential(
        torch.nn.Linear(67, 97), torch.nn.Tanh(), torch.nn.Linear(97, 61), torch.nn.Tanh(), torch.nn.Linear(61, 13)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 67, generator=g), torch.randn(GLOBAL_BATCH, 13, generator=g)


def train(model, opt, steps: range, rank: int = 0, world: int = 1) -> None:
    per = GLOBAL_BATCH // world
    for s in steps:
        x, y = batch(s)
        torch.nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]).backward()
        opt.step()
        opt.zero_grad()


def full_params(model) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def moments(opt, model) -> dict[str, torch.Tensor]:
    """Dequantized exp_avg of the int8 parameters, by name, from the optimizer's state dict."""
    from torch.distributed.tensor import DTensor

    from zeroadam.state_dict.entries import decode_entry

    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    out = {}
    for i, entry in sd["state"].items():
        whole = {k: (t.full_tensor() if isinstance(t, DTensor) else t) for k, t in entry.items()}
        if "exp_avg_codes" in whole:
            out[names[i]] = decode_entry(whole)[0]
    return out


def views_match(opt) -> bool:
    """optimizer.state[p] is this rank's part of the state ([Note: state views]): 1D views of elements [s, e) of the
    flattened parameter, with the scales of every block [s, e) touches; writing into a view writes the state."""
    from torch.distributed.tensor import DTensor

    from zeroadam.formats.quant import BLOCK_SIZE

    sd = opt.state_dict()  # collective
    ok = True
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st, entry = opt.state[p], sd["state"][i]
        s, e = st.elements
        ok &= set(st) == set(entry) and float(st["step"]) == float(entry["step"])
        for k, t in entry.items():
            if k == "step":
                continue
            if k.endswith("_scale"):
                want = t.full_tensor()[s // BLOCK_SIZE : (e - 1) // BLOCK_SIZE + 1]
            else:
                want = (t.to_local() if isinstance(t, DTensor) else t).reshape(-1)
            ok &= torch.equal(st[k], want)
    st = opt.state[opt.param_groups[0]["params"][0]]
    key = next(k for k in st if k != "step")
    saved = st[key].clone()
    st[key].zero_()
    ok &= bool((opt.state_dict()["state"][0][key].to_local() == 0).all())  # collective
    st[key] = saved  # copied back in
    return bool(ok)


def sharded(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_three_layer_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def suite(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    warnings.filterwarnings("ignore", category=FutureWarning)
    out: dict = {}
    model = sharded(rank, world)
    opt = ZeroAdam(model.parameters(), state_dtype="fp32", **HYPER)
    train(model, opt, range(STEPS), rank, world)
    out["fp32"] = full_params(model)

    # zeroadam.GradScaler in the usual fp16 clipping pattern (scale, unscale_, clip_grad_norm_, step, update), with an
    # inf in rank 1's gradient at step SKIP: both ranks skip that step and back the scale off together.
    model = sharded(rank, world)
    opt = ZeroAdam(model.parameters(), state_dtype="fp32", lr=HYPER["lr"], weight_decay=HYPER["weight_decay"])
    scaler = GradScaler("cpu", init_scale=2.0**10)
    per = GLOBAL_BATCH // world
    for s in range(STEPS):
        x, y = batch(s)
        loss = torch.nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per])
        scaler.scale(loss).backward()
        if s == SKIP and rank == 1:
            next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    out["scaler"] = full_params(model)
    out["scaler_scale"] = scaler.get_scale()

    model = sharded(rank, world)
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, range(SAVE_AT), rank, world)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    out["int8_at_save"] = full_params(model)
    out["moments_at_save"] = moments(opt, model)
    out["views_match"] = views_match(opt)
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    out["int8"] = full_params(model)
    out["state_bytes"] = opt.memory_stats()["state_bytes"]
    out["comm"] = opt.comm_stats()["elements"]

    model = sharded(rank, world)
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    out["resumed"] = full_params(model)
    return out


@pytest.fixture(scope="module")
def ckpt_dir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@pytest.fixture(scope="module")
def ranks(ckpt_dir: str) -> list[dict]:
    return run_ranks(suite, WORLD, ckpt_dir, timeout=240)


def reference_adamw(skip: tuple[int, ...] = ()) -> list[torch.Tensor]:
    model = make_three_layer_model()
    opt = torch.optim.AdamW(model.parameters(), lr=HYPER["lr"], weight_decay=HYPER["weight_decay"])
    for s in range(STEPS):
        x, y = batch(s)
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if s not in skip:
            opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_fp32_state_trains_like_adamw(ranks: list[dict]) -> None:
    ref = reference_adamw()
    for r in ranks:
        assert max_rel_err(r["fp32"], ref) <= 1e-5


def test_grad_scaler_unscale_and_clip_with_a_skipped_step(ranks: list[dict]) -> None:
    """zeroadam.GradScaler + unscale_ + torch's clip_grad_norm_ over DTensor parameters: like AdamW with that step
    skipped, on both ranks (the inf was on rank 1 only), with the scale backed off once."""
    ref = reference_adamw(skip=(SKIP,))
    for r in ranks:
        assert r["scaler_scale"] == 2.0**9
        # The scale is a power of two, so scaling and unscaling are exact: the fp32 run's tolerance holds.
        assert max_rel_err(r["scaler"], ref) <= 1e-5


def test_int8_state_is_the_same_as_one_process(ranks: list[dict]) -> None:
    """Blocks follow the global parameter, so a 2-rank mesh keeps the state one process keeps."""
    model = make_three_layer_model()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, range(SAVE_AT))
    one_params, one_moments = [p.detach().clone() for p in model.parameters()], moments(opt, model)
    for r in ranks:
        assert max_rel_err(r["int8_at_save"], one_params) <= 1e-5
        assert sorted(r["moments_at_save"]) == sorted(one_moments) == ["0.weight", "2.weight"]
        for name, m in one_moments.items():
            assert float((r["moments_at_save"][name] - m).norm() / m.norm()) <= 1e-5


def test_state_mapping_views_the_local_shard(ranks: list[dict]) -> None:
    assert all(r["views_match"] for r in ranks)


def test_state_lives_on_the_local_shard(ranks: list[dict]) -> None:
    model = make_three_layer_model()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, range(1))
    whole = opt.memory_stats()["state_bytes"]
    # Each rank keeps its rows (49 of 97 on rank 0); a block split by a cut has a scale on both sides.
    split_blocks = 2
    assert sum(r["state_bytes"] for r in ranks) == whole + split_blocks * 2 * 4
    for r in ranks:
        assert r["state_bytes"] <= 0.52 * whole
        assert set(r["comm"]) == {"all_reduce"}  # the norm and the absmax of split blocks; FSDP2 does the rest


def test_dcp_save_load_resumes_exactly(ranks: list[dict]) -> None:
    for r in ranks:
        assert max_rel_err(r["resumed"], r["int8"]) == 0.0


def test_dcp_checkpoint_loads_into_one_process(ranks: list[dict], ckpt_dir: str) -> None:
    """The 2-rank checkpoint, resharded by DCP into a plain single-process ZeroAdam, continues the same run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = make_three_layer_model()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    train(model, opt, range(SAVE_AT, STEPS))
    assert max_rel_err([p.detach() for p in model.parameters()], ranks[0]["int8"]) <= 1e-5
