"""The HF Trainer on 2 gloo CPU processes with ZeroAdam and ZeroAdamCallback: training like torch.optim.AdamW in the
same Trainer, checkpoints that hold the whole optimizer state, exact resume, and a clear error without the callback."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from distributed import run_ranks  # noqa: E402
from helpers import moment_tensors, max_rel_err  # noqa: E402

WORLD = 2
PER_DEVICE_BATCH, ACCUM, STEPS, SAVE_STEPS = 6, 2, 6, 3
SAMPLES = PER_DEVICE_BATCH * ACCUM * WORLD * STEPS  # one epoch is exactly STEPS steps


class Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        # 67*97 = 6499 elements: shards end inside parameters and blocks need padding.
        self.net = torch.nn.Sequential(torch.nn.Linear(67, 97), torch.nn.Tanh(), torch.nn.Linear(97, 13))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, 67, generator=g)
        self.y = torch.randn(SAMPLES, 13, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _trainer(out_dir: str, optimizer_cls, kwargs: dict, callbacks: list, save_steps: int = SAVE_STEPS):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=PER_DEVICE_BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        save_strategy="steps",
        save_steps=save_steps,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(
        model=Regressor(), args=args, train_dataset=Data(), optimizer_cls_and_kwargs=(optimizer_cls, kwargs), callbacks=callbacks
    )


def _params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def suite(rank: int, world: int, out_dir: str) -> dict:
    from zeroadam import ZeroAdam
    from zeroadam.integrations.transformers import ZeroAdamCallback

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ["ZEROADAM_CHECK_IN_TIMEOUT"] = "3"
    out: dict = {}
    t = _trainer(os.path.join(out_dir, "adamw"), torch.optim.AdamW, {}, [])
    t.train()
    out["adamw"] = _params(t)

    zero_kwargs = dict(state_dtype="fp32", stage=2, bucket_size=3000)
    run = os.path.join(out_dir, "zero")
    t = _trainer(run, ZeroAdam, zero_kwargs, [ZeroAdamCallback()])
    t.train()
    out["zero"] = _params(t)
    out["ddp"] = isinstance(t.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    out["comm"] = t.optimizer.optimizer.comm_stats()["elements"]
    if rank == 0:
        out["saved"] = torch.load(os.path.join(run, f"checkpoint-{SAVE_STEPS}", "optimizer.pt"), weights_only=True)

    t = _trainer(run, ZeroAdam, zero_kwargs, [ZeroAdamCallback()])
    t.train(resume_from_checkpoint=os.path.join(run, f"checkpoint-{SAVE_STEPS}"))
    out["resumed"] = _params(t)

    # 16-bit gradient shards (grad_dtype="bf16"): the Trainer's DDP averages p.grad, ZeroAdam keeps its shard in bf16.
    t = _trainer(os.path.join(out_dir, "bf16_grads"), ZeroAdam, {**zero_kwargs, "grad_dtype": "bf16"}, [ZeroAdamCallback()])
    t.train()
    out["bf16_grads"] = _params(t)
    out["bf16_grad_bytes"] = t.optimizer.optimizer.memory_stats()["grad_bytes"]

    # Last: without the callback rank 0 saves alone and must fail clearly; the run is broken after it.
    t = _trainer(os.path.join(out_dir, "nocallback"), ZeroAdam, zero_kwargs, [], save_steps=1)
    try:
        t.train()
        out["no_callback"] = None
    except RuntimeError as e:
        out["no_callback"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(suite, WORLD, d, timeout=300)


def test_trains_like_adamw_in_the_same_trainer(ranks: list[dict]) -> None:
    for r in ranks:
        assert max_rel_err(r["zero"], r["adamw"]) <= 1e-5
        assert r["ddp"]  # the Trainer wrapped the model: DDP averages, ZeroAdam sends no gradient
        assert "reduce" not in r["comm"] and "reduce_scatter" not in r["comm"]


def test_checkpoint_holds_the_whole_optimizer_state(ranks: list[dict]) -> None:
    saved = ranks[0]["saved"]
    shapes = [tuple(p.shape) for p in Regressor().parameters()]
    assert sorted(saved["state"]) == list(range(len(shapes)))
    assert sorted(i for g in saved["param_groups"] for i in g["params"]) == list(range(len(shapes)))
    for entry in saved["state"].values():
        assert "shard_elements" not in entry and float(entry["step"]) == SAVE_STEPS
    assert sorted(tuple(moment_tensors(e)[0].shape) for e in saved["state"].values()) == sorted(shapes)


def test_resume_from_checkpoint_continues_exactly(ranks: list[dict]) -> None:
    for r in ranks:
        assert max_rel_err(r["resumed"], r["zero"]) == 0.0


def test_without_the_callback_saving_fails_naming_the_fix(ranks: list[dict]) -> None:
    msg = ranks[0]["no_callback"]
    assert msg is not None and "ZeroAdamCallback" in msg


def test_bf16_gradient_shards_train_in_the_trainer(ranks: list[dict]) -> None:
    for r in ranks:
        # bf16 rounding of the gradient shard: the tolerance of tests/test_grad_dtype.py against AdamW.
        assert max_rel_err(r["bf16_grads"], r["adamw"]) <= 3e-2
