"""The ten published DeepSpeed configs of benchmarks/deepspeed_configs/ (HF transformers, Accelerate,
DeepSpeedExamples, DeepSpeed-Chat, gpt-neox, alpaca, FastChat) through zds, adapted as benchmarks/deepspeed_configs.py
adapts them: every one translates (the fp16 ones as written too), and a ZeRO-2 offload and the ZeRO-3 offload
config train on 2 gloo ranks with the losses of DeepSpeed's own ZeRO and AdamW, resuming exactly from a checkpoint."""
from __future__ import annotations

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is not installed (make test installs it; see the Makefile)")
pytest.importorskip("transformers", reason="the configs train a transformers GPT-2")

import deepspeed_configs as bench  # noqa: E402  (benchmarks/ is on the tests' path: pyproject.toml)
from distributed import run_ranks  # noqa: E402


@pytest.mark.parametrize("file", bench.names())
def test_every_config_translates(file: str) -> None:
    from zeroadam.integrations import deepspeed as zds

    raw = bench.load(file)
    stem = file.removesuffix(".json")
    model = bench.make_model()
    for bf16_for_fp16 in {False, bench.is_fp16(raw)}:
        cfg, _ = bench.adapt(raw, stem, "zds", bf16_for_fp16=bf16_for_fp16)
        t = zds.translate(cfg, model)
        assert t.zeroadam["stage"] == raw.get("zero_optimization", {}).get("stage", 0)
    zero = raw.get("zero_optimization", {})
    assert t.offload_params == ((zero.get("offload_param") or {}).get("device") == "cpu")


def test_fp16_at_stage_0_is_refused_on_a_cpu_naming_what_to_use() -> None:
    # gpt-neox 125M: fp16 at stage 0, where DeepSpeed's all-reduce takes the fp16 gradients; DeepSpeed itself
    # refuses fp16 on this CPU, and zds says so before anything runs.
    from zeroadam.integrations import deepspeed as zds

    cfg, _ = bench.adapt(bench.load("gptneox_125m.json"), "gptneox_125m", "zds", bf16_for_fp16=False)
    with pytest.raises(ValueError, match=r"fp16\.enabled=True.*Use bf16\.enabled"):
        zds.initialize(model=bench.make_model(), config=cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    files = ["fastchat_zero2.json", "alpaca_zero3_offload.json"]
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    return run_ranks(bench.rank_main, bench.WORLD, files, ckpt, timeout=900, pg_timeout=300)[0]


@pytest.mark.parametrize("stem", ["fastchat_zero2", "alpaca_zero3_offload"])
def test_config_trains_like_deepspeed_and_resumes_exactly(trained: dict, stem: str) -> None:
    res = trained[stem]
    ours, theirs = res["zds"], res["ds"]
    assert "error" not in ours and "error" not in theirs, (ours.get("error"), theirs.get("error"))
    assert ours["losses"][-1] < ours["losses"][0]  # it trains
    # fp32 (FastChat): the same math as DeepSpeed's ZeRO-2 + torch AdamW; bf16 (alpaca): bf16 forward/backward
    # on both sides, ZeroAdam's compact master weights against DeepSpeed's fp32 masters.
    tol = 1e-5 if stem == "fastchat_zero2" else 2e-2
    for a, b in zip(ours["losses"], theirs["losses"]):
        assert abs(a - b) <= tol * abs(b)
    assert ours["resumed_equal"]
