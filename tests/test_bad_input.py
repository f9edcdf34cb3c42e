"""Bad options and unsupported parameters: a ValueError that names the argument and the value, raised before
anything is built or changed; sparse gradients and complex parameters get a message that says what to do."""
from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch

from zeroadam import ZeroAdam


def params() -> list[torch.Tensor]:
    return [torch.randn(17, requires_grad=True)]


def message_pattern(arg: str, value: Any) -> str:
    return re.escape(f"{arg}={value!r}")


BAD_HYPERS = [
    # (keyword, value, name in the message)
    ("lr", -1e-3, "lr"),
    ("lr", math.nan, "lr"),
    ("lr", "0.1", "lr"),
    ("eps", -1e-8, "eps"),
    ("weight_decay", -0.01, "weight_decay"),
    ("weight_decay", math.inf, "weight_decay"),
]


@pytest.mark.parametrize("kw, value, arg", BAD_HYPERS)
def test_bad_hyperparameter(kw: str, value: Any, arg: str) -> None:
    with pytest.raises(ValueError, match=message_pattern(arg, value)):
        ZeroAdam(params(), **{kw: value})


@pytest.mark.parametrize(
    "betas, arg, value",
    [
        ((1.0, 0.999), "betas[0]", 1.0),
        ((0.9, 1.0), "betas[1]", 1.0),
        ((-0.1, 0.999), "betas[0]", -0.1),
        ((0.9, 1.5), "betas[1]", 1.5),
        ((0.9,), "betas", (0.9,)),
        ((0.9, 0.99, 0.999), "betas", (0.9, 0.99, 0.999)),
        (0.9, "betas", 0.9),
    ],
)
def test_bad_betas(betas: Any, arg: str, value: Any) -> None:
    with pytest.raises(ValueError, match=message_pattern(arg, value)):
        ZeroAdam(params(), betas=betas)


@pytest.mark.parametrize(
    "kw, value",
    [
        ("state_dtype", "int4"),
        ("state_dtype", "float32"),
        ("master_weights", "fp16"),
        ("master_weights", None),
        ("offload", "gpu"),
        ("offload", "nvme"),
        ("stage", 4),
        ("stage", -1),
        ("stage", 1.0),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", -1.0),
        ("max_grad_norm", math.inf),
    ],
)
def test_bad_option(kw: str, value: Any) -> None:
    with pytest.raises(ValueError, match=message_pattern(kw, value)):
        ZeroAdam(params(), **{kw: value})


def test_bad_option_message_lists_the_choices() -> None:
    with pytest.raises(ValueError) as info:
        ZeroAdam(params(), state_dtype="int4")
    assert all(repr(c) in str(info.value) for c in ("int8", "bf16", "fp32"))


def test_bad_hyperparameter_in_a_param_group() -> None:
    with pytest.raises(ValueError, match=message_pattern("lr", -1.0)):
        ZeroAdam([{"params": params()}, {"params": params(), "lr": -1.0}])
    opt = ZeroAdam(params())
    with pytest.raises(ValueError, match=message_pattern("weight_decay", -0.5)):
        opt.add_param_group({"params": params(), "weight_decay": -0.5})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_bad_clip_grad_norm_argument(max_norm: float) -> None:
    opt = ZeroAdam(params())
    with pytest.raises(ValueError, match=message_pattern("max_norm", max_norm)):
        opt.clip_grad_norm_(max_norm)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_sparse_gradient_is_refused_before_any_update(backend: Any) -> None:
    emb = torch.nn.Embedding(17, 4, sparse=True)
    dense = torch.nn.Linear(4, 3)
    opt = ZeroAdam([*dense.parameters(), emb.weight], state_dtype="fp32", backend=backend)
    dense(emb(torch.tensor([1, 5, 5]))).sum().backward()
    assert emb.weight.grad.is_sparse
    before = [p.detach().clone() for p in (*dense.parameters(), emb.weight)]
    with pytest.raises(RuntimeError, match="sparse") as info:
        opt.step()
    assert "sparse=False" in str(info.value)  # says what to do instead
    assert all(torch.equal(p, q) for p, q in zip((*dense.parameters(), emb.weight), before))
    assert len(opt.state) == 0


def test_complex_parameter_is_refused() -> None:
    z = torch.randn(17, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex") as info:
        ZeroAdam([z])
    assert "view_as_real" in str(info.value)
    opt = ZeroAdam(params())
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_integer_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        ZeroAdam([torch.arange(17)])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_sparse_gradient_is_refused_with_offload(stage: int) -> None:
    emb = torch.nn.Embedding(17, 4, sparse=True)
    dense = torch.nn.Linear(4, 3)
    opt = ZeroAdam([*dense.parameters(), emb.weight], state_dtype="fp32", offload="cpu", stage=stage)
    dense(emb(torch.tensor([1, 5, 5]))).sum().backward()
    before = [p.detach().clone() for p in (*dense.parameters(), emb.weight)]
    with pytest.raises(RuntimeError, match="sparse") as info:
        opt.step()
    assert "sparse=False" in str(info.value) and "reshape" not in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip((*dense.parameters(), emb.weight), before))


def test_sparse_embedding_is_refused_by_shard_model() -> None:
    from zeroadam import shard_model

    model = torch.nn.Sequential(torch.nn.Embedding(17, 4, sparse=True), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=re.escape("0 is Embedding(sparse=True)")) as info:
        shard_model(model)
    assert "sparse=False" in str(info.value)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_meta_parameters_with_offload_are_refused_at_construction(stage: int) -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="meta device") as info:
        ZeroAdam(model.parameters(), offload="cpu", stage=stage)
    assert "to_empty" in str(info.value) and "init_fn" in str(info.value)
