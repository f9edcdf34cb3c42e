"""DeepSpeed configs as people write them, through ``zeroadam.integrations.deepspeed.initialize`` (zds) and through
plain ``deepspeed.initialize`` with the config's own Adam/AdamW, on 2 gloo CPU ranks.

The ten configs are in ``benchmarks/deepspeed_configs/*.json``, as their repositories have them (the source of
each, with its commit, in ``sources.json``: DeepSpeed refuses unknown keys, so no comment field goes into a config).

Each config is adapted the same way for both paths (see ``adapt``):

- batch sizes cut for 2 CPU ranks: ``train_micro_batch_size_per_gpu`` 2, ``gradient_accumulation_steps`` 1,
  ``train_batch_size`` 4;
- HF ``"auto"`` values: what the Trainer fills from its arguments (``TRAINER``: ``--learning_rate 1e-3`` -- the
  Trainer's default 5e-5 barely moves a loss in 10 steps --, weight decay 0, ``--warmup_steps 2`` (DeepSpeed 0.19's
  schedulers refuse 0), 10 steps; ``--bf16`` where
  the repository's documented command passes it). zds gets only those the Trainer's arguments decide (lr, warmup
  steps, total steps, ``--bf16``, batch sizes) and resolves the rest itself; DeepSpeed gets every one filled;
- schedulers' ``warmup_num_steps`` above 10 capped at 5, so that the lr is not ~0 for the whole run;
- zds: ``"type": "ZeroAdam"`` with the config's ``lr`` / ``betas`` / ``eps`` / ``weight_decay`` (a missing one
  given DeepSpeed's default for the config's type, so that both paths run the same hyperparameters) and
  ``state_dtype: "fp32"`` (DeepSpeed's moments are fp32);
- DeepSpeed: the config's own type with ``"torch_adam": true`` (``torch.optim.AdamW``: no op to JIT-compile on a
  CPU; ``Adam`` has DeepSpeed's ``adam_w_mode`` default, i.e. AdamW too) and an explicit ``weight_decay``;
- fp16: DeepSpeed refuses fp16 on this CPU. Both paths are then run with ``bf16`` in its place (the table says
  so), and zds is also run on the fp16 config as written, its final loss (or its error) in the note.

Model: a 2-layer GPT-2 from transformers (n_embd 64, 4 heads, vocab 256, no dropout), the same initial weights on
every rank; 10 steps of deterministic token sequences, each rank its half of the global batch; the loss recorded
is the ranks' mean. zds saves a checkpoint after step 5 (``zds.save_checkpoint``) and a fresh engine resumes from
it (``zds.load_checkpoint``) for steps 6-10: "resumed == uninterrupted" compares the losses and weights of the two
runs exactly.

Run: ``.venv/bin/python benchmarks/deepspeed_configs.py`` (a few minutes on 2 cores); writes
``benchmarks/results/deepspeed_configs.json`` and prints the README's table.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import describe_machine, error_text, format_table, write_json  # noqa: E402

CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"
WORLD, MICRO, STEPS, SAVE_AT, SEQ, VOCAB = 2, 2, 10, 5, 32, 256
# What the HF Trainer would fill the "auto" values with for this run (its TrainingArguments, see the docstring).
TRAINER = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0, "warmup_steps": 2}
# The documented launch command of these repositories passes --bf16 True: the Trainer turns "auto" on.
BF16_FROM_COMMAND = {"alpaca_zero3_offload"}
# Keys the installed DeepSpeed (0.19) refuses as written (pydantic extra_forbidden), as zds does: the config is
# trained without them, and both refusals of the config as written are recorded.
REFUSED_AS_WRITTEN = {
    "dse_cifar": ("bf16", ("loss_scale", "loss_scale_window", "hysteresis", "min_loss_scale", "initial_scale_power")),
}
# gpt-neox puts its top-level weight_decay into the optimizer's param groups.
EXTRA_WEIGHT_DECAY = {"gptneox_125m": 0.1}

Path_ = Literal["zds", "ds"]


def is_auto(v: Any) -> bool:
    return isinstance(v, str) and v == "auto"


def names() -> list[str]:
    return sorted(json.loads((CONFIG_DIR / "sources.json").read_text()))


def load(name: str) -> dict:
    return json.loads((CONFIG_DIR / name).read_text())


def describe(cfg: dict) -> str:
    """stage / offload / dtype as written."""
    zero = cfg.get("zero_optimization", {})
    off = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
           if (zero.get(k) or {}).get("device", "none") != "none"]
    if zero.get("cpu_offload"):
        off.append("optimizer")
    dtype = "fp32"
    for key, name in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16")):
        enabled = (cfg.get(key) or {}).get("enabled", False)
        if enabled is True:
            dtype = name
        elif is_auto(enabled) and dtype == "fp32":
            dtype = f"{name}=auto"
    return f"{zero.get('stage', 0)} / {'+'.join(off) or '-'} / {dtype}"


def is_fp16(cfg: dict) -> bool:
    return (cfg.get("fp16") or {}).get("enabled") is True


def adapt(raw: dict, stem: str, path: Path_, bf16_for_fp16: bool, as_written: bool = False) -> tuple[dict, list[str]]:
    """The config for one path of the run, and what was changed beyond batch sizes and "auto" (for the note)."""
    cfg = copy.deepcopy(raw)
    notes: list[str] = []
    if stem in REFUSED_AS_WRITTEN and not as_written:
        section, dropped = REFUSED_AS_WRITTEN[stem]
        for key in dropped:
            cfg[section].pop(key, None)
        notes.append(f"{section} loss-scale keys dropped")
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        cfg.pop(k, None)
    cfg.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=1, train_batch_size=MICRO * WORLD)
    cfg["steps_per_print"] = 10**9
    cfg["wall_clock_breakdown"] = False

    # Optimizer: the config's type and params; "auto" from the Trainer's arguments; a missing one from DeepSpeed's
    # default for the type (FusedAdam's weight_decay 0.0; torch.optim.AdamW's 0.01 with torch_adam).
    opt = cfg.get("optimizer") or {"type": "AdamW", "params": {}}  # FastChat's: the Trainer's AdamW
    kind, params = opt.get("type", "AdamW"), dict(opt.get("params") or {})
    torch_adam = bool(params.get("torch_adam"))
    if stem in EXTRA_WEIGHT_DECAY:
        params["weight_decay"] = EXTRA_WEIGHT_DECAY[stem]
    if "optimizer" not in cfg:
        params = {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}
    defaults = {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01 if torch_adam else 0.0}
    hyper = {}
    for key in ("lr", "betas", "eps", "weight_decay"):
        v = params.get(key, defaults.get(key))
        hyper[key] = TRAINER[key] if is_auto(v) else v
    if path == "zds":
        cfg["optimizer"] = {"type": "ZeroAdam", "params": {**hyper, "state_dtype": "fp32"}}
    else:
        mode = {"adam_w_mode": params["adam_w_mode"]} if "adam_w_mode" in params else {}
        cfg["optimizer"] = {"type": kind, "params": {**hyper, "torch_adam": True, **mode}}

    sched = (cfg.get("scheduler") or {}).get("params")
    if sched is not None:
        if is_auto(sched.get("warmup_num_steps")):
            sched["warmup_num_steps"] = TRAINER["warmup_steps"]
        elif sched.get("warmup_num_steps", 0) > STEPS:
            notes.append(f"warmup {sched['warmup_num_steps']}->5 steps")
            sched["warmup_num_steps"] = 5
        if is_auto(sched.get("total_num_steps")):
            sched["total_num_steps"] = STEPS
        if path == "ds":
            for key, value in (("warmup_min_lr", 0), ("warmup_max_lr", hyper["lr"])):
                if is_auto(sched.get(key)):
                    sched[key] = value

    for section in ("fp16", "bf16", "bfloat16"):
        sec = cfg.get(section)
        if sec is not None and is_auto(sec.get("enabled")):
            if section != "fp16" and stem in BF16_FROM_COMMAND:
                sec["enabled"] = True  # a Trainer argument: zds cannot know it
            elif path == "ds":
                sec["enabled"] = False  # the Trainer without --fp16 / --bf16 (zds resolves the same itself)
    if path == "ds":
        if is_auto(cfg.get("gradient_clipping")):
            cfg["gradient_clipping"] = TRAINER["max_grad_norm"]
        zero = cfg.get("zero_optimization", {})
        hidden = 64
        filled = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                  "stage3_param_persistence_threshold": 10 * hidden}
        for key, value in filled.items():
            if is_auto(zero.get(key)):
                zero[key] = value  # what the Trainer computes from model.config.hidden_size
    if bf16_for_fp16 and is_fp16(cfg):
        cfg["fp16"] = {"enabled": False}
        cfg.pop("bfloat16", None)
        cfg["bf16"] = {"enabled": True}
        notes.append("fp16->bf16")
    return cfg, notes


# ---------------------------------------------------------------------------------------------- one rank
def make_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg)


def tokens(step: int, rank: int) -> torch.Tensor:
    """Arithmetic sequences mod VOCAB with a random start and stride: learnable, so the loss falls."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (MICRO * WORLD, 1), generator=g)
    stride = torch.randint(1, 8, (MICRO * WORLD, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ)) % VOCAB
    return seq[rank * MICRO : (rank + 1) * MICRO]


def train(engine: Any, rank: int, steps: range) -> list[float]:
    losses = []
    for s in steps:
        ids = tokens(s, rank)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / WORLD)
    return losses


def weights(engine: Any) -> dict[str, torch.Tensor]:
    import zeroadam

    if getattr(engine.module, "_zeroadam_sharded", None) is not None:
        return {k: v.float() for k, v in zeroadam.full_state_dict(engine.module).items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def run_zds(cfg: dict, rank: int, ckpt: str) -> dict:
    from zeroadam.integrations import deepspeed as zds

    engine, _, _, _ = zds.initialize(model=make_model(), config=copy.deepcopy(cfg))
    losses = train(engine, rank, range(SAVE_AT))
    zds.save_checkpoint(engine, ckpt)
    losses += train(engine, rank, range(SAVE_AT, STEPS))
    straight = weights(engine)
    del engine
    engine, _, _, _ = zds.initialize(model=make_model(), config=copy.deepcopy(cfg))
    zds.load_checkpoint(engine, ckpt)
    resumed_losses = train(engine, rank, range(SAVE_AT, STEPS))
    resumed = weights(engine)
    same = resumed_losses == losses[SAVE_AT:] and all(torch.equal(straight[k], resumed[k]) for k in straight)
    return {"losses": losses, "resumed_losses": resumed_losses, "resumed_equal": same}


def run_ds(cfg: dict, rank: int) -> dict:
    import deepspeed

    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=copy.deepcopy(cfg))
    return {"losses": train(engine, rank, range(STEPS)), "optimizer": type(engine.optimizer).__name__}


def attempt(fn: Any, *args: Any) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - each config's failure is a result, not the end of the run
        import traceback

        traceback.print_exc()
        return {"error": error_text(e, 400)}


def rank_main(rank: int, world: int, selected: list[str], ckpt_dir: str) -> dict:
    os.environ["LOCAL_RANK"] = str(rank)
    warnings.filterwarnings("ignore")
    import deepspeed  # noqa: F401  (logs the accelerator once)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    out = {}
    for file in selected:
        stem = file.removesuffix(".json")
        raw = load(file)
        fp16 = is_fp16(raw)
        res: dict[str, Any] = {"described": describe(raw)}
        zcfg, notes = adapt(raw, stem, "zds", bf16_for_fp16=fp16)
        dcfg, _ = adapt(raw, stem, "ds", bf16_for_fp16=fp16)
        res["notes"] = notes
        if stem in REFUSED_AS_WRITTEN:
            from zeroadam.integrations import deepspeed as zds

            written = adapt(raw, stem, "zds", fp16, as_written=True)[0]
            res["zds_as_written"] = attempt(lambda c: (zds.translate(c), {})[1], written)
            res["ds_as_written"] = attempt(run_ds, adapt(raw, stem, "ds", fp16, as_written=True)[0], rank)
        res["zds"] = attempt(run_zds, zcfg, rank, os.path.join(ckpt_dir, stem))
        res["ds"] = attempt(run_ds, dcfg, rank)
        if fp16:  # the config as written: zds's fp16 run, and DeepSpeed's answer
            res["zds_fp16"] = attempt(run_zds, adapt(raw, stem, "zds", bf16_for_fp16=False)[0], rank,
                                      os.path.join(ckpt_dir, stem + "-fp16"))
            res["ds_fp16"] = attempt(run_ds, adapt(raw, stem, "ds", bf16_for_fp16=False)[0], rank)
        out[stem] = res
        if rank == 0:
            print(stem, {k: (v.get("error") or v.get("losses", [None])[-1]) if isinstance(v, dict) else v
                         for k, v in res.items()}, flush=True)
    return out


# ---------------------------------------------------------------------------------------------- table
def row(stem: str, res: dict, sources: dict) -> list[Any]:
    src = sources[stem + ".json"]
    z, d = res["zds"], res["ds"]
    zl = z["losses"][-1] if "losses" in z else None
    dl = d["losses"][-1] if "losses" in d else None
    rel = abs(zl - dl) / abs(dl) if zl is not None and dl is not None else None
    notes = list(res["notes"])
    if "error" in z:
        notes.append(f"zds: {z['error']}")
    if "error" in d:
        notes.append(f"DeepSpeed: {d['error']}")
    if "zds_fp16" in res:
        zf = res["zds_fp16"]
        fp16_zds = f"{zf['losses'][-1]:.4f}" if "losses" in zf else "refused: " + zf["error"][:160]
        notes.append(f"fp16 as written: zds {fp16_zds}"
                     f"{', resumed equal' if zf.get('resumed_equal') else ''}")
        df = res["ds_fp16"]
        notes.append("DeepSpeed " + ("%.4f" % df["losses"][-1] if "losses" in df else "refused: " + df["error"][:120]))
    if "ds_as_written" in res:
        notes.append(f"as written: zds {res['zds_as_written'].get('error', 'accepted')[:110]}; DeepSpeed "
                     f"{res['ds_as_written'].get('error', 'accepted')[:110]}")
    return [stem, src["repo"].split("/")[-1] + ":" + src["path"].split("/")[-1], res["described"],
            None if zl is None else f"{zl:.4f}", None if dl is None else f"{dl:.4f}",
            None if rel is None else f"{rel:.1e}", z.get("resumed_equal"), "; ".join(notes)]


HEADERS = ["config", "source", "stage / offload / dtype", "zds loss", "DeepSpeed AdamW loss", "rel. diff",
           "resumed == uninterrupted", "note"]


def main(selected: Optional[list[str]] = None) -> dict:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from distributed import run_ranks

    selected = selected or names()
    with tempfile.TemporaryDirectory() as ckpt:
        ranks = run_ranks(rank_main, WORLD, selected, ckpt, timeout=3000, pg_timeout=300)
    results = ranks[0]
    sources = json.loads((CONFIG_DIR / "sources.json").read_text())
    rows = [row(stem, res, sources) for stem, res in results.items()]
    print(format_table(HEADERS, rows, left=(0, 1, 2, 7)))
    payload = {"machine": describe_machine("cpu"), "world": WORLD, "steps": STEPS, "checkpoint_after_step": SAVE_AT,
               "trainer_arguments": TRAINER, "sources": sources, "results": results,
               "table": {"headers": HEADERS, "rows": rows}}
    if selected == names():
        write_json("deepspeed_configs.json", payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:] or None)
