"""torch.optim's contract, as a drop-in for torch.optim.AdamW must keep it: named parameters, state-dict hooks,
deepcopy, ``optimizer.state[p]`` as a mapping, repeated param groups, ``maximize``, the implementation flags
(``foreach`` / ``fused``), tensor betas and in-place loads of ``state_dict()`` (the torchao / DCP pattern)."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from helpers import max_rel_err
from zeroadam import ZeroAdam

HYPER = dict(lr=1e-2, weight_decay=0.1)


def make_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(17, 257), torch.nn.Tanh(), torch.nn.Linear(257, 3))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 17, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# fp32 state on fp32 parameters follows torch.optim.AdamW operation for operation: 10 steps agree to rounding.
TOL = 1e-6


def test_named_parameters_like_adamw() -> None:
    model, ref = make_mlp(), make_mlp()
    opt = ZeroAdam(model.named_parameters(), state_dtype="fp32", **HYPER)
    adamw = torch.optim.AdamW(ref.named_parameters(), **HYPER)
    train(model, opt, 5)
    train(ref, adamw, 5)
    assert max_rel_err(params(model), params(ref)) <= TOL
    names = [n for n, _ in model.named_parameters()]
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == names == adamw.state_dict()["param_groups"][0]["param_names"]
    # As torch.optim: a named state dict gives its names to an unnamed optimizer that loads it; a state dict
    # without names leaves the optimizer's own.
    plain = ZeroAdam(make_mlp().parameters(), state_dtype="fp32", **HYPER)
    plain.load_state_dict(sd)
    plain_adamw = torch.optim.AdamW(make_mlp().parameters(), **HYPER)
    plain_adamw.load_state_dict(adamw.state_dict())
    assert plain.param_groups[0]["param_names"] == plain_adamw.param_groups[0]["param_names"] == names
    assert plain.state_dict()["param_groups"][0]["param_names"] == names
    unnamed_sd = ZeroAdam(make_mlp().parameters(), state_dtype="fp32", **HYPER).state_dict()
    named = ZeroAdam(make_mlp().named_parameters(), state_dtype="fp32", **HYPER)
    named.load_state_dict(unnamed_sd)
    assert named.param_groups[0]["param_names"] == names


def test_param_names_must_name_every_parameter() -> None:
    model = make_mlp()
    opt = ZeroAdam(model.named_parameters(), state_dtype="fp32", **HYPER)
    train(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["param_names"] = sd["param_groups"][0]["param_names"][:-1]
    with pytest.raises(ValueError, match="param_names"):
        opt.load_state_dict(sd)


def test_named_parameters_wrong_pairs_are_refused() -> None:
    with pytest.raises(TypeError, match="tensors or \\(name, tensor\\) pairs"):
        ZeroAdam([("w", "not a tensor")])


def test_state_dict_hooks_fire() -> None:
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, 1)
    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and seen == ["pre"]
    opt.load_state_dict(sd)
    assert seen == ["pre", "load_pre", "load_post"]


def test_non_parameter_state_round_trips_like_adamw() -> None:
    """``optimizer.state`` may hold keys that are no parameter (a pre-hook's marker, a subclass's counter):
    torch.optim packs them into ``state_dict()["state"]`` as they are and puts them back on load."""
    model, ref = make_mlp(), make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    adamw = torch.optim.AdamW(ref.parameters(), **HYPER)
    for o in (opt, adamw):
        o.register_state_dict_pre_hook(lambda o: o.state.__setitem__("marker", 1))
        assert o.state_dict()["state"]["marker"] == 1  # before any step too
    train(model, opt, 2)
    sd = opt.state_dict()
    assert sd["state"]["marker"] == 1 and set(sd["state"]) == {0, 1, 2, 3, "marker"}

    other = make_mlp()
    other.load_state_dict(model.state_dict())
    opt2 = ZeroAdam(other.parameters(), state_dtype="int8", **HYPER)
    opt2.state["stale"] = True  # replaced, as torch.optim replaces its whole state
    opt2.load_state_dict(sd)
    assert opt2.state["marker"] == 1 and "stale" not in opt2.state
    train(model, opt, 1, start=2)
    train(other, opt2, 1, start=2)
    assert max_rel_err(params(other), params(model)) == 0
    with pytest.raises(ValueError, match="which no param group lists"):
        opt2.load_state_dict({**sd, "state": {**sd["state"], 9: sd["state"][0]}})


def test_load_pre_hook_may_replace_the_state_dict() -> None:
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="fp32", **HYPER)
    train(model, opt, 1)
    sd = opt.state_dict()

    def lower_lr(o, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 1e-5
        return state_dict

    opt.register_load_state_dict_pre_hook(lower_lr)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-5


def test_deepcopy_keeps_everything_and_steps_alike() -> None:
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", max_grad_norm=1.0, **HYPER)
    train(model, opt, 2)
    opt.skipped_steps, opt.overflow = 3, True
    # Copy the model and the optimizer together, so the copy's state belongs to the copy's parameters.
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.options == opt.options and opt2.skipped_steps == 3 and opt2.overflow is True
    assert list(opt2.param_groups[0]["params"]) == list(model2.parameters())
    train(model, opt, 2, start=2)
    train(model2, opt2, 2, start=2)
    assert max_rel_err(params(model2), params(model)) == 0


def test_deepcopy_of_a_sharded_engine_is_refused_with_the_fix() -> None:
    opt = ZeroAdam(make_mlp().parameters(), offload="cpu")  # the flat engine, one rank
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


def test_state_is_a_mapping_like_adamw() -> None:
    model, ref = make_mlp(), make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="fp32", **HYPER)
    adamw = torch.optim.AdamW(ref.parameters(), **HYPER)
    train(model, opt, 3)
    train(ref, adamw, 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        st, want = opt.state[p], adamw.state[q]
        assert set(st) == set(want) == {"step", "exp_avg", "exp_avg_sq"} and len(st) == 3
        assert float(st["step"]) == float(want["step"]) == 3
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].shape == want[k].shape
            # The parameters agree to rounding after each step, so the next gradients (and the moments, linear
            # in them) agree to a few ulps relative to their norm; single small elements can differ more.
            assert float((st[k] - want[k]).norm() / want[k].norm()) <= 1e-5


def test_state_mapping_can_be_moved_key_by_key() -> None:
    # What Lightning's optimizer_to_device and similar tools do: replace every tensor by a moved copy.
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, 2)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    for st in opt.state.values():
        for k, v in list(st.items()):
            st[k] = v.to("cpu", copy=True)
    for p in model.parameters():
        assert all(torch.equal(opt.state[p][k], v) for k, v in before[id(p)].items())
    train(model, opt, 1, start=2)  # still steps with the replaced tensors
    assert opt.state[next(model.parameters())]["step"].item() == 3
    with pytest.raises(ValueError, match="must stay"):
        opt.state[next(model.parameters())]["exp_avg_codes"] = torch.zeros(3)


def test_repeated_param_groups_number_each_parameter_once() -> None:
    # torch issue #36831: a parameter listed twice keeps one number.
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), **HYPER)
    opt.param_groups.extend(opt.param_groups)
    adamw = torch.optim.AdamW(make_mlp().parameters(), **HYPER)
    adamw.param_groups.extend(adamw.param_groups)
    ids = [g["params"] for g in opt.state_dict()["param_groups"]]
    assert ids == [g["params"] for g in adamw.state_dict()["param_groups"]] == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("where", ["kwarg", "group"])
def test_maximize_ascends_like_adamw(where: str) -> None:
    model, ref = make_mlp(), make_mlp()
    if where == "kwarg":
        opt = ZeroAdam(model.parameters(), state_dtype="fp32", maximize=True, **HYPER)
    else:
        opt = ZeroAdam([{"params": list(model.parameters()), "maximize": True}], state_dtype="fp32", **HYPER)
    adamw = torch.optim.AdamW(ref.parameters(), maximize=True, **HYPER)
    train(model, opt, 5)
    train(ref, adamw, 5)
    assert max_rel_err(params(model), params(ref)) <= TOL


def test_maximize_one_weight() -> None:
    # The example: grad +1, lr 0.1, no decay; AdamW(maximize=True) moves w to 1.1.
    w = torch.nn.Parameter(torch.ones(1))
    opt = ZeroAdam([{"params": [w], "maximize": True}], lr=0.1, weight_decay=0)
    w.grad = torch.ones(1)
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([1.1]))


@pytest.mark.parametrize("flag", ["amsgrad", "capturable", "differentiable"])
def test_unsupported_flags_are_refused_wherever_they_appear(flag: str) -> None:
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"{flag}=True in the constructor"):
        ZeroAdam([w], **{flag: True})
    with pytest.raises(ValueError, match=f"{flag}=True in a param group"):
        ZeroAdam([{"params": [w], flag: True}])
    ZeroAdam([w], **{flag: False})  # AdamW's defaults, passed explicitly, are fine


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True), dict(fused=False, foreach=False)])
def test_implementation_flags_are_accepted_and_change_nothing(flags: dict) -> None:
    model, ref = make_mlp(), make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **flags, **HYPER)
    plain = ZeroAdam(ref.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, 3)
    train(ref, plain, 3)
    assert max_rel_err(params(model), params(ref)) == 0


def test_tensor_betas_like_adamw() -> None:
    model, ref = make_mlp(), make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="fp32", betas=(torch.tensor(0.9), torch.tensor(0.999)), **HYPER)
    adamw = torch.optim.AdamW(ref.parameters(), betas=(torch.tensor(0.9), torch.tensor(0.999)), **HYPER)
    train(model, opt, 3)
    train(ref, adamw, 3)
    # AdamW computes the bias corrections of tensor betas in fp32 tensor arithmetic, ZeroAdam in fp64 from their
    # values: 1 - beta^t then differs by ~1 fp32 ulp (6e-8 relative), which lr / (1 - beta1^t) carries into every
    # update; 3 steps stay within 1e-5.
    assert max_rel_err(params(model), params(ref)) <= 1e-5
    with pytest.raises(ValueError, match="betas\\[1\\]"):
        ZeroAdam(make_mlp().parameters(), betas=(0.9, torch.tensor(1.5)))


@pytest.mark.parametrize("offload", [None, "cpu"])  # stage 0, and one rank of the flat engine
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_in_place_load_of_state_dict_restores_moments_and_step(tmp_path, fmt: str, offload) -> None:
    """torchao's pattern: ``dcp.load(opt.state_dict())`` fills the optimizer's own tensors, step included."""
    import torch.distributed.checkpoint as dcp

    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype=fmt, offload=offload, **HYPER)
    train(model, opt, 3)
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
    saved = {k: {n: v.clone() for n, v in e.items()} for k, e in opt.state_dict()["state"].items()}

    other = make_mlp()
    opt2 = ZeroAdam(other.parameters(), state_dtype=fmt, offload=offload, **HYPER)
    train(other, opt2, 1, start=10)  # state exists (as for AdamW, an in-place load needs it)
    dcp.load({"optim": opt2.state_dict()}, checkpoint_id=str(tmp_path))
    for k, entry in opt2.state_dict()["state"].items():
        for n, v in entry.items():
            assert torch.equal(v, saved[k][n]), (k, n)
    assert all(float(st["step"]) == 3 for st in opt2.state.values())
    # Training on from there is training on from the saved optimizer.
    other.load_state_dict(model.state_dict())
    train(model, opt, 2, start=3)
    train(other, opt2, 2, start=3)
    assert max_rel_err(params(other), params(model)) == 0


def _in_place_stage3_one_rank(rank: int, world: int, tmp: str, fmt: str) -> dict:
    import warnings

    import torch.distributed.checkpoint as dcp

    warnings.simplefilter("ignore")  # the hidden-gradients warning
    model, opt = _sharded(3, fmt)
    _train_ranks(rank, world, model, opt, range(3))
    dcp.save(opt.state_dict(), checkpoint_id=tmp)
    saved = {k: {n: v.clone() for n, v in e.items()} for k, e in opt.state_dict()["state"].items()}
    model2, opt2 = _sharded(3, fmt)
    _train_ranks(rank, world, model2, opt2, range(10, 11))
    dcp.load(opt2.state_dict(), checkpoint_id=tmp)
    loaded = opt2.state_dict()["state"]
    return {
        "equal": loaded.keys() == saved.keys() and all(torch.equal(v, saved[k][n]) for k, e in loaded.items() for n, v in e.items()),
        "steps": [float(st["step"]) for st in opt2.state.values()],
    }


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_in_place_load_at_stage_3_on_one_rank_restores_moments_and_step(tmp_path, fmt: str) -> None:
    from distributed import run_ranks

    (res,) = run_ranks(_in_place_stage3_one_rank, 1, str(tmp_path), fmt)
    assert res["equal"] and res["steps"] == [3.0] * 4


def test_state_dict_keyed_by_parameter_names_loads_as_parameters_state() -> None:
    """torch's get_optimizer_state_dict names parameters by FQN in ``state`` and ``param_groups``: those entries are
    the parameters' state, not keys of optimizer.state to keep beside it."""
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, 2)
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    sd = {**sd, "state": {names[i]: e for i, e in sd["state"].items()}}
    sd["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    opt2 = ZeroAdam(make_mlp().parameters(), state_dtype="int8", **HYPER)
    opt2.load_state_dict(sd)
    assert all(isinstance(k, torch.Tensor) for k in opt2.state) and len(opt2.state) == len(names)
    assert all(float(st["step"]) == 2 for st in opt2.state.values())


def test_stock_adamw_refuses_int8_codes_loudly() -> None:
    """A ZeroAdam int8 state dict must not load into torch.optim.AdamW as if its codes were moments: the codes have
    keys of their own, so AdamW fails on its first step instead of training on numbers up to 127 and 255."""
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, 2)
    adamw = torch.optim.AdamW(make_mlp().parameters(), **HYPER)
    adamw.load_state_dict(opt.state_dict())
    with pytest.raises(KeyError, match="exp_avg"):
        for p in adamw.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        adamw.step()


def test_state_dicts_saved_with_int8_codes_under_exp_avg_still_load() -> None:
    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, 2)
    sd = opt.state_dict()
    legacy = copy.deepcopy(sd)
    for entry in legacy["state"].values():
        if "exp_avg_codes" in entry:
            entry["exp_avg"], entry["exp_avg_sq"] = entry.pop("exp_avg_codes"), entry.pop("exp_avg_sq_codes")
    assert any(e["exp_avg"].dtype == torch.int8 for e in legacy["state"].values())
    other = ZeroAdam(make_mlp().parameters(), state_dtype="int8", **HYPER)
    other.load_state_dict(legacy)
    for k, entry in other.state_dict()["state"].items():
        assert all(torch.equal(v, sd["state"][k][n]) for n, v in entry.items()), k


@pytest.mark.parametrize("nested", [False, True])
def test_consolidate_converts_a_plain_state_dict_file_for_adamw(tmp_path, nested: bool, capsys) -> None:
    from zeroadam.tools.cli import main

    model = make_mlp()
    opt = ZeroAdam(model.parameters(), state_dtype="int8", **HYPER)
    train(model, opt, 3)
    sd = opt.state_dict()
    src = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": sd, "iter_num": 3} if nested else sd, src)

    assert main(["inspect", str(src)]) == 0
    said = capsys.readouterr().out
    assert "not a checkpoint directory" in said and "ZeroAdam state dict" in said and "int8" in said

    out = tmp_path / "adamw.pt"
    assert main(["consolidate", str(src), str(out)]) == 0
    converted = torch.load(out, weights_only=True)
    adamw_sd = converted["optimizer"] if nested else converted
    if nested:
        assert converted["iter_num"] == 3 and converted["model"].keys() == model.state_dict().keys()
    ref = ZeroAdam(make_mlp().parameters(), state_dtype="fp32", **HYPER)
    ref.load_state_dict(sd)  # the same moments, decoded into fp32
    for k, entry in adamw_sd["state"].items():
        assert entry.keys() == {"step", "exp_avg", "exp_avg_sq"} and float(entry["step"]) == 3
        want = ref.state_dict()["state"][k]
        assert torch.equal(entry["exp_avg"], want["exp_avg"]) and torch.equal(entry["exp_avg_sq"], want["exp_avg_sq"])
    adamw = torch.optim.AdamW(make_mlp().parameters(), **HYPER)
    adamw.load_state_dict(adamw_sd)
    for p in adamw.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    adamw.step()  # loads and steps


def test_inspect_of_a_file_that_is_not_torch_says_so(tmp_path, capsys) -> None:
    from zeroadam.tools.cli import main

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a torch file")
    assert main(["inspect", str(junk)]) == 1
    assert "torch.load(weights_only=True) cannot read it" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_zero_gradients_move_parameters_only_by_decay_like_adamw(fmt: str) -> None:
    """A zero gradient gives a zero update: the parameter stays put, or, with weight decay, decays exactly as
    AdamW's does (torch's test_step_is_noop_for_zero_grads)."""
    torch.manual_seed(0)
    for wd in (0.0, 0.1):
        w, ref = torch.randn(5000, requires_grad=True), None
        ref = w.detach().clone().requires_grad_()
        before = w.detach().clone()
        opt = ZeroAdam([w], state_dtype=fmt, lr=1e-2, weight_decay=wd)
        adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=wd)
        for _ in range(3):
            w.grad, ref.grad = torch.zeros_like(w), torch.zeros_like(ref)
            opt.step()
            adamw.step()
        if wd == 0:
            assert torch.equal(w.detach(), before)
        assert torch.allclose(w.detach(), ref.detach(), rtol=1e-6, atol=0)


def test_tensor_lr_must_have_one_element() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        ZeroAdam([w], lr=torch.tensor([1e-3, 1e-3]))


def test_meta_parameters_are_refused_at_step_with_the_fix() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
        opt = ZeroAdam(model.parameters(), fused=True)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="meta device.*to_empty"):
        opt.step()


# ---------------------------------------------------------------------------------------------- sharded stages
def _sharded(stage: int, fmt: str) -> tuple[torch.nn.Module, ZeroAdam]:
    import zeroadam
    from helpers import make_model

    model = make_model()
    if stage == 3:
        model = zeroadam.shard_model(model)
    return model, ZeroAdam(model.parameters(), state_dtype=fmt, stage=stage, **HYPER)


def _train_ranks(rank: int, world: int, model: torch.nn.Module, opt: ZeroAdam, steps: range) -> None:
    from helpers import GLOBAL_BATCH, batch

    per = GLOBAL_BATCH // world
    for s in steps:
        x, y = batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]).backward()
        opt.step()
    opt.zero_grad()


def _views(opt: ZeroAdam) -> dict[int, tuple[tuple[int, int], dict[str, torch.Tensor]]]:
    index = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {index[p]: (st.elements, {k: v.clone() for k, v in st.items()}) for p, st in opt.state.items()}


def _same_views(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[i][0] == b[i][0] and a[i][1].keys() == b[i][1].keys() and all(torch.equal(t, b[i][1][k]) for k, t in a[i][1].items())
        for i in a
    )


def _sharded_state_contract(rank: int, world: int, tmp: str) -> dict:
    """optimizer.state[p] at stages 1-3 ([Note: state views]), and DCP refused ([Note: DCP and sharded state dicts])."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    warnings.simplefilter("ignore")  # the hidden-gradients warning of stages 2-3
    out: dict = {}
    # A DCP checkpoint that DCP can take: stage 0 (every rank holds the same whole state).
    model0, opt0 = _sharded(0, "int8")
    _train_ranks(rank, world, model0, opt0, range(1))
    dcp.save(opt0.state_dict(), checkpoint_id=f"{tmp}/{world}-stage0")
    for stage in (1, 2, 3):
        for fmt in ("fp32", "int8"):
            r: dict = {}
            model, opt = _sharded(stage, fmt)
            r["empty_before_step"] = len(opt.state) == 0
            _train_ranks(rank, world, model, opt, range(3))
            ranges = opt.engine.local_ranges()
            r["holds_local_params"] = set(opt.state) == set(ranges) and all(
                opt.state[p].elements == ranges[p] for p in ranges
            )
            r["views"] = _views(opt)
            # What Lightning's optimizer_to_device does (the same device: the same tensors), then copies of every
            # tensor assigned back: the state is unchanged and still live.
            try:
                from lightning.fabric.utilities.optimizer import _optimizer_to_device

                _optimizer_to_device(opt, torch.device("cpu"))
            except ImportError:  # pragma: no cover
                pass
            for st in opt.state.values():
                for k, v in list(st.items()):
                    st[k] = v.clone()
            r["unchanged_by_moves"] = _same_views(_views(opt), r["views"])
            # torch's get_optimizer_state_dict finds state, so it does not step the optimizer to create it.
            osd = get_optimizer_state_dict(model, opt)
            r["get_osd_keeps_state"] = _same_views(_views(opt), r["views"])
            sd = opt.state_dict()
            if rank == 0:
                r["full"] = sd["state"]
            # DCP refuses a sharded state dict on every rank, naming the fix.
            for name, d in (("state_dict", sd), ("get_optimizer_state_dict", {"optim": osd})):
                try:
                    dcp.save(d, checkpoint_id=f"{tmp}/{world}-{stage}-{fmt}-{name}")
                    r[f"dcp_{name}"] = "saved"
                except CheckpointException as e:  # every rank's error, ours included
                    r[f"dcp_{name}"] = str(e)
            # An in-place dcp.load is refused too, and torch.save writes the refusing step tensors as plain ones.
            try:
                dcp.load(opt.state_dict(), checkpoint_id=f"{tmp}/{world}-stage0")
                r["dcp_load"] = "loaded"
            except CheckpointException as e:
                r["dcp_load"] = str(e)
            buf = io.BytesIO()
            torch.save(sd, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=True)
            r["saved_plain"] = all(type(e["step"]) is torch.Tensor and not e["step"].__dict__ for e in loaded["state"].values())
            # set_optimizer_state_dict of that state dict (rank 0 whole, the others their shard) loads it exactly.
            # On an optimizer without state torch first steps it with zero gradients set in p.grad, which stage 3
            # refuses (they bypass the reduce-scatter) with the fix.
            opt2 = ZeroAdam(model.parameters(), state_dtype=fmt, stage=stage, **HYPER)
            try:
                set_optimizer_state_dict(model, opt2, osd)
                r["set_osd_error"] = None
            except RuntimeError as e:
                r["set_osd_error"] = str(e)
                opt2.zero_grad()
                opt2.load_state_dict(osd)
            r["set_osd_exact"] = _same_views(_views(opt2), r["views"])
            r["no_fqn_entries"] = all(isinstance(k, torch.Tensor) for k in opt2.state)
            # One more step: the views follow the state (they are not copies).
            _train_ranks(rank, world, model, opt, range(3, 4))
            shard = opt.engine.shard_entries()
            r["live_after_step"] = all(
                torch.equal(st[k], shard[p][k]) and float(st["step"]) == 4 for p, st in opt.state.items() for k in st if k != "step"
            )
            # Writing into a view writes the state.
            p, st = next(iter(opt.state.items()))
            key = next(k for k in st if k != "step")
            st[key].fill_(3)
            r["write_through"] = bool((opt.engine.shard_entries()[p][key] == 3).all())
            errors = {}
            for what, fn in (
                ("dtype", lambda: st.__setitem__(key, st[key].double())),
                ("size", lambda: st.__setitem__(key, st[key][:-1].clone())),
                ("step", lambda: st.__setitem__("step", torch.tensor(99.0))),
                ("delete", lambda: st.__delitem__(key)),
                ("unknown", lambda: st.__setitem__("max_exp_avg_sq", st[key])),
            ):
                try:
                    fn()
                    errors[what] = None
                except (ValueError, TypeError, KeyError) as e:
                    errors[what] = f"{type(e).__name__}: {e}"
            st["step"] = st["step"]  # its own value: accepted
            r["errors"] = errors
            out[(stage, fmt)] = r
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_state_is_a_mapping_of_live_views_and_dcp_is_refused(world: int, tmp_path) -> None:
    from distributed import run_ranks
    from zeroadam.formats.quant import BLOCK_SIZE, num_blocks

    ranks = run_ranks(_sharded_state_contract, world, str(tmp_path), timeout=900)
    for cfg in ranks[0]:
        stage, fmt = cfg
        full = ranks[0][cfg]["full"]
        covered: dict[int, list[tuple[int, int]]] = {}
        for rank, res in enumerate(ranks):
            r = res[cfg]
            for flag in (
                "empty_before_step", "holds_local_params", "unchanged_by_moves", "get_osd_keeps_state", "set_osd_exact",
                "no_fqn_entries", "live_after_step", "write_through", "saved_plain",
            ):
                assert r[flag] is True, (cfg, rank, flag)
            for name in ("state_dict", "get_optimizer_state_dict", "load"):
                assert "zeroadam.checkpoint" in r[f"dcp_{name}"], (cfg, rank, name, r[f"dcp_{name}"][:300])
            if stage == 3:
                assert "load_state_dict" in r["set_osd_error"], (cfg, rank)
            else:
                assert r["set_osd_error"] is None, (cfg, rank)
            e = r["errors"]
            assert e["dtype"].startswith("ValueError") and "must stay" in e["dtype"], e
            assert e["size"].startswith("ValueError") and "must stay" in e["size"], e
            assert e["step"].startswith("ValueError") and "load_state_dict" in e["step"], e
            assert e["delete"].startswith("TypeError") and e["unknown"].startswith("KeyError"), e
            # Each view is this rank's elements [a, b) of the whole state (int8: the scales of exactly its blocks).
            for i, ((a, b), tensors) in r["views"].items():
                covered.setdefault(i, []).append((a, b))
                assert a % BLOCK_SIZE == 0 and set(tensors) == set(full[i]), (cfg, rank, i)
                for k, t in tensors.items():
                    whole = full[i][k].reshape(-1)
                    if k == "step":
                        assert float(t) == float(whole) == 3
                    elif k.endswith("_scale"):
                        assert torch.equal(t, whole[a // BLOCK_SIZE : a // BLOCK_SIZE + num_blocks(b - a)]), (cfg, i, k)
                    else:
                        assert torch.equal(t, whole[a:b]), (cfg, i, k)
        # Together the ranks hold every element of every parameter once.
        for i, pieces in covered.items():
            pieces.sort()
            assert pieces[0][0] == 0 and all(x[1] == y[0] for x, y in zip(pieces, pieces[1:])), (cfg, i, pieces)
            assert pieces[-1][1] == full[i]["exp_avg_sq" if "exp_avg_sq" in full[i] else "exp_avg_sq_codes"].numel()
        assert set(covered) == set(full)
