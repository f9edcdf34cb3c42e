"""ZeroAdam state dicts: the saved format, round trips through torch.save / torch.load(weights_only=True),
migration from torch.optim.AdamW, conversion between state formats, and validation that leaves the optimizer
untouched when it rejects a state dict.
"""
from __future__ import annotations

import io
import math
import re
from typing import Any, Optional, Sequence

import pytest
import torch

from helpers import moment_tensors, rel_err
from zeroadam import BLOCK_SIZE, MIN_QUANT_NUMEL, ZeroAdam

STATE_DTYPES = ["int8", "bf16", "fp32"]
# Awkward sizes; (4097,) is above the quantization threshold; the last parameter is bf16 (it has a master).
SHAPES = [(17,), (257,), (4097,), (13, 19), (4097,)]
DTYPES = [torch.float32] * 4 + [torch.bfloat16]
HYPERS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
]
LAYOUT = [[0, 2, 4], [1, 3]]  # parameter indices of each group
FP32_LAYOUT = [[0, 2], [1, 3]]  # without the bf16 parameter, for runs beside torch.optim.AdamW
MOMENT_DTYPES = {  # (exp_avg, exp_avg_sq) storage of each format
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "int8": (torch.int8, torch.uint8),
}


# ---------------------------------------------------------------------------------------------- helpers
def make_params(shapes: Sequence[tuple] = SHAPES, dtypes: Sequence[torch.dtype] = DTYPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(d).requires_grad_() for s, d in zip(shapes, dtypes)]


def copy_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def groups(
    params: Sequence[torch.Tensor], lr_scale: float = 1.0, layout: Sequence[Sequence[int]] = LAYOUT
) -> list[dict]:
    return [
        dict(params=[params[i] for i in idx], **{**hyper, "lr": hyper["lr"] * lr_scale})
        for idx, hyper in zip(layout, HYPERS)
    ]


def set_grads(param_sets: Sequence[Sequence[torch.Tensor]], step: int) -> None:
    g = torch.Generator().manual_seed(10_000 + step)
    for i, p in enumerate(param_sets[0]):
        grad = torch.randn(p.shape, generator=g)
        for params in param_sets:
            params[i].grad = grad.to(params[i].dtype, copy=True)


def train(opts_and_params: Sequence[tuple[torch.optim.Optimizer, Sequence[torch.Tensor]]], steps: range) -> None:
    for step in steps:
        set_grads([params for _, params in opts_and_params], step)
        for opt, _ in opts_and_params:
            opt.step()


def through_disk(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def cloned_state_dict(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    return {
        "state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in e.items()} for k, e in sd["state"].items()},
        "param_groups": [{k: v for k, v in g.items()} for g in sd["param_groups"]],
    }


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    """Bitwise: same entries, keys, dtypes, shapes and values; same group hyperparameters."""
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        ea, eb = a["state"][k], b["state"][k]
        assert ea.keys() == eb.keys(), k
        for n in ea:
            assert ea[n].dtype == eb[n].dtype and ea[n].shape == eb[n].shape, (k, n)
            assert torch.equal(ea[n], eb[n]), (k, n)
    assert a["param_groups"] == b["param_groups"]


def int8_reference_decode(entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force decoding of the documented int8 code maps (zeroadam/quant.py, [Note: code maps])."""
    codes_m, codes_v = entry["exp_avg_codes"], entry["exp_avg_sq_codes"]
    n = codes_m.numel()
    m_scale = entry["exp_avg_scale"].repeat_interleave(BLOCK_SIZE)[:n]
    v_scale = entry["exp_avg_sq_scale"].repeat_interleave(BLOCK_SIZE)[:n]
    c = codes_m.reshape(-1).double()
    m = torch.sign(c) * (c.abs() / 127) ** 2 * m_scale.double()
    v = (codes_v.reshape(-1).double() / 255) ** 4 * v_scale.double()
    return m.view(codes_m.shape), v.view(codes_m.shape)


# ---------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_state_dict_keys_and_dtypes(state_dtype: str) -> None:
    params = make_params()
    opt = ZeroAdam(groups(params), state_dtype=state_dtype, master_weights="fp32")
    train([(opt, params)], range(3))
    sd = opt.state_dict()
    assert {"state", "param_groups"} <= sd.keys()
    order = [i for idx in LAYOUT for i in idx]  # state dicts number parameters group by group
    assert sorted(sd["state"]) == list(range(len(params)))
    for idx, hyper, g in zip(LAYOUT, HYPERS, sd["param_groups"]):
        assert g["params"] == [order.index(i) for i in idx]
        assert {k: g[k] for k in hyper} == hyper
    for k, entry in sd["state"].items():
        p = params[order[k]]
        quantized = state_dtype == "int8" and p.numel() >= MIN_QUANT_NUMEL
        expected = {"step", "exp_avg", "exp_avg_sq"}
        if quantized:  # codes under keys of their own, so that AdamW cannot load them as values
            expected = {"step", "exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scale", "exp_avg_sq_scale"}
        if p.dtype == torch.bfloat16:
            expected |= {"master"}
        assert entry.keys() == expected, k
        assert torch.is_tensor(entry["step"]) and entry["step"].dtype == torch.float32 and float(entry["step"]) == 3
        m, v = moment_tensors(entry)
        assert m.shape == v.shape == p.shape
        fmt = state_dtype if p.numel() >= MIN_QUANT_NUMEL else "fp32"  # small tensors keep fp32 moments
        assert (m.dtype, v.dtype) == MOMENT_DTYPES[fmt]
        if quantized:
            for name in ("exp_avg_scale", "exp_avg_sq_scale"):
                assert entry[name].dtype == torch.float32
                assert entry[name].shape == (math.ceil(p.numel() / BLOCK_SIZE),)
        if p.dtype == torch.bfloat16:
            assert entry["master"].dtype == torch.float32 and entry["master"].shape == p.shape


@pytest.mark.parametrize("master_weights, key", [("fp32", "master"), ("compact", "master_residual"), ("none", None)])
def test_master_keys(master_weights: str, key: Optional[str]) -> None:
    params = make_params()
    opt = ZeroAdam(groups(params), state_dtype="fp32", master_weights=master_weights)
    train([(opt, params)], range(2))
    entry = opt.state_dict()["state"][2]  # params[4], the bf16 one: third in group 0
    assert entry.keys() - {"step", "exp_avg", "exp_avg_sq"} == ({key} if key else set())


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("master_weights", ["fp32", "compact", "none"])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_round_trip_continues_bitwise(state_dtype: str, master_weights: str) -> None:
    a = make_params()
    opt_a = ZeroAdam(groups(a), state_dtype=state_dtype, master_weights=master_weights)
    train([(opt_a, a)], range(5))
    sd = through_disk(opt_a.state_dict())
    b = copy_params(a)
    # Built with other learning rates: the loaded param groups must bring the saved ones back.
    opt_b = ZeroAdam(groups(b, lr_scale=7.0), state_dtype=state_dtype, master_weights=master_weights)
    opt_b.load_state_dict(sd)
    assert_state_dicts_equal(cloned_state_dict(opt_b), cloned_state_dict(opt_a))
    train([(opt_a, a), (opt_b, b)], range(5, 15))
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert_state_dicts_equal(cloned_state_dict(opt_b), cloned_state_dict(opt_a))


# ---------------------------------------------------------------------------------------------- migration
@pytest.mark.parametrize(
    "state_dtype, tol",
    # fp32 copies AdamW's moments bit for bit. int8 / bf16 convert them once and then run in their format:
    # measured error after 20 more steps int8 5.2e-4, bf16 1.8e-4 (fp32 1e-8); an optimizer that starts
    # without the migrated moments is off by 6e-3 to 3e-2.
    [("fp32", 1e-6), ("bf16", 1e-3), ("int8", 2e-3)],
)
def test_load_adamw_state_dict(state_dtype: str, tol: float) -> None:
    shapes, dtypes = SHAPES[:4], DTYPES[:4]  # AdamW keeps no master: fp32 parameters only
    theirs = make_params(shapes, dtypes)
    ref = torch.optim.AdamW(groups(theirs, layout=FP32_LAYOUT))
    train([(ref, theirs)], range(10))
    sd = through_disk(ref.state_dict())
    ours, fresh_params = copy_params(theirs), copy_params(theirs)
    opt = ZeroAdam(groups(ours, lr_scale=7.0, layout=FP32_LAYOUT), state_dtype=state_dtype)
    opt.load_state_dict(sd)
    fresh = ZeroAdam(groups(fresh_params, layout=FP32_LAYOUT), state_dtype=state_dtype)

    loaded = opt.state_dict()
    for k, entry in ref.state_dict()["state"].items():
        assert float(loaded["state"][k]["step"]) == float(entry["step"]) == 10
        fmt = state_dtype if entry["exp_avg"].numel() >= MIN_QUANT_NUMEL else "fp32"
        assert moment_tensors(loaded["state"][k])[0].dtype == MOMENT_DTYPES[fmt][0]
        if fmt == "fp32":
            assert torch.equal(loaded["state"][k]["exp_avg"], entry["exp_avg"])
            assert torch.equal(loaded["state"][k]["exp_avg_sq"], entry["exp_avg_sq"])
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]

    train([(ref, theirs), (opt, ours), (fresh, fresh_params)], range(10, 30))
    err = max(rel_err(p, q) for p, q in zip(ours, theirs))
    fresh_err = max(rel_err(p, q) for p, q in zip(fresh_params, theirs))
    assert err <= tol
    assert err < fresh_err / 10  # the moments really carried over


# ---------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("target", ["bf16", "fp32"])
def test_int8_state_dict_converts(target: str) -> None:
    a = make_params()
    opt_a = ZeroAdam(groups(a), state_dtype="int8")
    train([(opt_a, a)], range(5))
    sd = through_disk(opt_a.state_dict())
    b = copy_params(a)
    opt_b = ZeroAdam(groups(b), state_dtype=target)
    opt_b.load_state_dict(sd)
    converted = opt_b.state_dict()["state"]
    # Rounding to bf16 moves a value by less than one ulp, 2**-7 of itself (stochastic rounding may take the
    # farther neighbour).
    rtol = 2.0**-7 if target == "bf16" else 1e-6
    for k, entry in sd["state"].items():
        c = converted[k]
        assert float(c["step"]) == 5
        if "exp_avg_codes" not in entry:  # small tensors were fp32 already: copied as they are
            assert torch.equal(c["exp_avg"], entry["exp_avg"]) and torch.equal(c["exp_avg_sq"], entry["exp_avg_sq"])
            continue
        master = {"master_residual"} if "master_residual" in entry else set()
        assert c.keys() == {"step", "exp_avg", "exp_avg_sq"} | master  # the int8 scales are gone
        assert c["exp_avg"].dtype == MOMENT_DTYPES[target][0]
        m, v = int8_reference_decode(entry)
        torch.testing.assert_close(c["exp_avg"].double(), m, rtol=rtol, atol=1e-30)
        torch.testing.assert_close(c["exp_avg_sq"].double(), v, rtol=rtol, atol=1e-30)
    train([(opt_a, a), (opt_b, b)], range(5, 15))
    # Both continue from the same moments; the int8 run keeps requantizing (measured 9e-4 after 10 steps).
    assert max(rel_err(p, q) for p, q in zip(b, a)) <= 3e-3


# ---------------------------------------------------------------------------------------------- validation
def _trained_target() -> tuple[ZeroAdam, list[torch.Tensor]]:
    params = make_params()
    opt = ZeroAdam(groups(params), state_dtype="int8")
    train([(opt, params)], range(3))
    return opt, params


def _source_state_dict(shapes: Sequence[tuple] = SHAPES, group_sizes: Optional[Sequence[int]] = None) -> dict:
    """A valid int8 state dict of an optimizer over parameters of these shapes, with other learning rates."""
    params = make_params(shapes)
    gs = groups(params, lr_scale=5.0)
    if group_sizes is not None:
        gs = [dict(g, params=g["params"][:n]) for g, n in zip(gs, group_sizes)]
    opt = ZeroAdam(gs, state_dtype="int8")
    train([(opt, params)], range(4))
    return through_disk(opt.state_dict())


def _tamper(key: str, index: int, value: Any) -> dict:
    sd = _source_state_dict()
    sd["state"][index][key] = value
    return sd


def _first_group_only() -> dict:
    sd = _source_state_dict()
    sd["param_groups"] = sd["param_groups"][:1]
    return sd


def _with_group_flag(group: int, key: str, value: Any) -> dict:
    sd = _source_state_dict()
    sd["param_groups"][group][key] = value
    return sd


def _with_extra_entry(key: int) -> dict:
    sd = _source_state_dict()
    sd["state"][key] = sd["state"][0]
    return sd


# State entries 0-2 are group 0 (params 0, 2, 4), entries 3-4 group 1 (params 1, 3). Every case but "groups" and
# "count" has valid entries before the bad one, so a partial load would show.
REJECTED = {
    # name: (state dict factory, text the message must contain)
    "shape": (lambda: _source_state_dict(SHAPES[:1] + [(258,)] + SHAPES[2:]), "param_groups[1]['params'][0]"),
    "count": (lambda: _source_state_dict(group_sizes=[3, 1]), "param_groups[1]"),
    "groups": (_first_group_only, "param groups"),
    "scales": (lambda: _tamper("exp_avg_scale", 1, torch.ones(3)), "param_groups[0]['params'][1]"),
    "dtype": (lambda: _tamper("exp_avg", 4, torch.zeros(13, 19, dtype=torch.float64)), "param_groups[1]['params'][1]"),
    "master": (
        lambda: _tamper("master_residual", 2, torch.zeros(17, dtype=torch.int8)),
        "param_groups[0]['params'][2]",
    ),
    "step": (lambda: _tamper("step", 4, torch.tensor(2.5)), "param_groups[1]['params'][1]"),
    "amsgrad": (lambda: _with_group_flag(1, "amsgrad", True), "param_groups[1] has amsgrad=True"),
    "unlisted": (lambda: _with_extra_entry(99), "parameter 99"),
    # Hyperparameters get the constructor's checks, naming the group: none of these may reach a step.
    "lr": (lambda: _with_group_flag(1, "lr", -5.0), "param_groups[1]: invalid lr=-5.0"),
    "lr_text": (lambda: _with_group_flag(0, "lr", "fast"), "param_groups[0]: invalid lr='fast'"),
    "weight_decay": (lambda: _with_group_flag(1, "weight_decay", math.nan), "param_groups[1]: invalid weight_decay=nan"),
    "betas": (lambda: _with_group_flag(0, "betas", [1.5, 2]), "param_groups[0]: invalid betas[0]=1.5"),
    "eps": (lambda: _with_group_flag(1, "eps", -1e-8), "param_groups[1]: invalid eps=-1e-08"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_state_dict_leaves_optimizer_unchanged(case: str) -> None:
    factory, where = REJECTED[case]
    opt, params = _trained_target()
    bad = factory()
    before_params = [p.detach().clone() for p in params]
    before = cloned_state_dict(opt)
    with pytest.raises(ValueError, match=re.escape(where)):
        opt.load_state_dict(bad)
    assert all(torch.equal(p, q) for p, q in zip(params, before_params))
    assert_state_dicts_equal(cloned_state_dict(opt), before)
    # And the optimizer still steps as one that never saw the bad state dict.
    twin_params = make_params()
    twin = ZeroAdam(groups(twin_params), state_dtype="int8")
    train([(twin, twin_params)], range(3))
    for p, q in zip(twin_params, before_params):
        assert torch.equal(p, q)
    train([(opt, params), (twin, twin_params)], range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_adamw_state_dict_with_bad_hyperparameters_is_rejected() -> None:
    params = make_params()
    adamw = torch.optim.AdamW(groups(params))
    train([(adamw, params)], range(2))
    sd = adamw.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    opt, target = _trained_target()
    before = cloned_state_dict(opt)
    with pytest.raises(ValueError, match=re.escape("param_groups[0]: invalid lr=-1.0")):
        opt.load_state_dict(sd)
    sd["param_groups"][0]["lr"] = 1e-3
    sd["param_groups"][1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=re.escape("param_groups[1]: invalid betas[1]=1.5")):
        opt.load_state_dict(sd)
    assert_state_dicts_equal(cloned_state_dict(opt), before)


def test_transposed_shape_is_rejected() -> None:
    opt, params = _trained_target()
    bad = _source_state_dict(SHAPES[:3] + [(19, 13)] + SHAPES[4:])
    with pytest.raises(ValueError, match=re.escape("param_groups[1]['params'][1]")):
        opt.load_state_dict(bad)
