"""The memory estimator: its formulas against ZeroAdam.memory_stats(), known model sizes, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from distributed import run_ranks
from zeroadam import ZeroAdam
from zeroadam.tools.cli import main
from zeroadam.tools.memory import (
    CARDS,
    ModelTensors,
    Setup,
    config_tensors,
    ddp_adamw_memory,
    deepspeed_memory,
    master_bytes_per_param,
    moment_bytes,
    moment_bytes_per_param,
    parse_count,
    sharded_moment_bytes,
    zeroadam_memory,
)


def awkward_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 67*97 = 6499 and 97*131 = 12707 take the int8 path and end mid-block; the biases (97, 131) and the
    # 300*13 = 3900 embedding stay below MIN_QUANT_NUMEL and keep fp32 moments.
    return torch.nn.Sequential(torch.nn.Embedding(300, 13), torch.nn.Linear(13, 67), torch.nn.Linear(67, 97),
                               torch.nn.Tanh(), torch.nn.Linear(97, 131))


def large_only_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(67, 97, bias=False), torch.nn.Tanh(), torch.nn.Linear(97, 131, bias=False))


def one_step(model: torch.nn.Module, **opt_kwargs: object) -> dict[str, int]:
    opt = ZeroAdam(model.parameters(), lr=1e-3, **opt_kwargs)  # type: ignore[arg-type]
    x = torch.randn(5, 67)
    for p in model.parameters():  # gradients of every shape, whatever the forward
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.memory_stats()


@pytest.mark.parametrize("state_dtype", ["int8", "bf16", "fp32"])
def test_stage0_state_bytes_match_memory_stats(state_dtype: str) -> None:
    model = awkward_model()
    numels = [p.numel() for p in model.parameters()]
    stats = one_step(model, state_dtype=state_dtype)
    assert stats["state_bytes"] == moment_bytes(numels, state_dtype)  # type: ignore[arg-type]
    setup = Setup(world_size=1, stage=0, state_dtype=state_dtype, param_dtype="fp32")  # type: ignore[arg-type]
    est = zeroadam_memory(sum(numels), setup, model=ModelTensors(numels, [], 0))
    assert est.gpu["moments"] == stats["state_bytes"]
    assert est.gpu["params"] == stats["param_bytes"]
    assert est.gpu["grads"] == stats["grad_bytes"]
    assert est.gpu["master"] == stats["master_bytes"] == 0


@pytest.mark.parametrize("state_dtype", ["int8", "bf16", "fp32"])
def test_per_parameter_formula_is_exact_up_to_block_padding(state_dtype: str) -> None:
    model = large_only_model()
    numels = [p.numel() for p in model.parameters()]
    stats = one_step(model, state_dtype=state_dtype)
    estimate = moment_bytes_per_param(state_dtype) * sum(numels)  # type: ignore[arg-type]
    # The formula counts 2 * 4 / 256 B of scales per element; each tensor's last, partial block has two whole scales.
    assert 0 <= stats["state_bytes"] - estimate < 8 * len(numels)


@pytest.mark.parametrize("master_weights", ["fp32", "compact", "none", "auto"])
def test_master_bytes_of_16_bit_parameters(master_weights: str) -> None:
    model = awkward_model().to(torch.bfloat16)
    psi = sum(p.numel() for p in model.parameters())
    stats = one_step(model, state_dtype="int8", master_weights=master_weights)
    assert stats["master_bytes"] == master_bytes_per_param(master_weights, "bf16") * psi  # type: ignore[arg-type]
    assert stats["param_bytes"] == 2 * psi


def sharded_stats(rank: int, world: int) -> dict[str, int]:
    model = awkward_model()
    opt = ZeroAdam(model.parameters(), lr=1e-3, state_dtype="int8", stage=2, bucket_size=5000)
    g = torch.Generator().manual_seed(rank)
    loss = model[1:](model[0](torch.randint(0, 300, (6,), generator=g))).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return opt.memory_stats()


def test_stage2_shards_match_estimate_on_three_ranks() -> None:
    world = 3
    numels = [p.numel() for p in awkward_model().parameters()]
    psi = sum(numels)
    setup = Setup(world_size=world, stage=2, state_dtype="int8", param_dtype="fp32")
    est = zeroadam_memory(psi, setup, model=ModelTensors(numels, [], 0))
    # Padding of the flat buffers: each tensor starts on a 256-element block, and each of the two spaces (int8
    # and fp32 moments) is rounded up to whole blocks per rank.
    tensors, spaces = len(numels), 2
    for stats in run_ranks(sharded_stats, world):
        assert stats["state_bytes"] == est.gpu["moments"] == sharded_moment_bytes(numels, "int8", world)
        # The fp32 gradient shard, 4 / N bytes per parameter.
        assert 0 <= stats["grad_bytes"] - est.gpu["grads"] <= 4 * 256 * (tensors / world + spaces)
        assert 0 <= stats["param_bytes"] - est.gpu["params"] <= 4 * 256 * (tensors + world * spaces)


def test_zero_paper_figure_1() -> None:
    # ZeRO (Rajbhandari et al. 2020), Figure 1: 7.5B parameters on 64 GPUs, K = 12: 120 GB for DDP, 31.4 GB
    # for stage 1 (P_os), 16.6 GB for stage 2 (P_os+g), 1.9 GB for stage 3 (P_os+g+p).
    for stage, gb in [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)]:
        pl = deepspeed_memory(7.5e9, Setup(world_size=64, stage=stage))
        assert round((pl.gpu_total - pl.gpu["buffers"]) / 1e9, 1) == gb
    assert ddp_adamw_memory(1e9, 8).gpu_total == 20e9  # 16 B per parameter + DDP's bucket copy of the gradients


def test_zeroadam_formulas_by_stage() -> None:
    psi, n = 7e9, 8
    m, w = 2 + 8 / 256, 1.0  # int8 moments, compact master, bf16 parameters
    for stage, (params, grads, moments, master) in {
        0: (2 * psi, 2 * psi, m * psi, w * psi),
        1: (2 * psi, 2 * psi + 4 * psi / n, m * psi / n, w * psi / n),
        2: (2 * psi, 4 * psi / n, m * psi / n, w * psi / n),
        3: (2 * psi / n, 4 * psi / n, m * psi / n, w * psi / n),
    }.items():
        gpu = zeroadam_memory(psi, Setup(world_size=n, stage=stage)).gpu
        assert (gpu["params"], gpu["grads"], gpu["moments"], gpu["master"]) == pytest.approx((params, grads, moments, master))
    off = zeroadam_memory(psi, Setup(world_size=n, stage=2, offload="cpu"))
    assert off.gpu["moments"] == off.gpu["master"] == off.gpu["grads"] == 0
    assert off.host["moments"] == pytest.approx(m * psi / n) and off.host["grads"] == pytest.approx(4 * psi / n)


def test_known_parameter_counts() -> None:
    llama2_7b = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}
    mistral_7b = {**llama2_7b, "model_type": "mistral", "intermediate_size": 14336, "num_key_value_heads": 8}
    gpt2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
    assert config_tensors(llama2_7b).num_params == 6_738_415_616
    assert config_tensors(mistral_7b).num_params == 7_241_732_096
    assert config_tensors(gpt2).num_params == 124_439_808


def test_parse_count_and_bad_values() -> None:
    assert parse_count("7e9") == parse_count("7B") == parse_count("7000M") == 7_000_000_000
    assert parse_count("350m") == 350_000_000 and parse_count("124439808") == 124_439_808
    with pytest.raises(ValueError, match="params"):
        parse_count("seven billion")
    with pytest.raises(ValueError, match="state_dtype"):
        Setup(world_size=8, state_dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="world_size"):
        Setup(world_size=0)
    with pytest.raises(ValueError, match="intermediate_size"):
        config_tensors({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": None})


# ---------------------------------------------------------------------------------------------- the command
SMALL_LLAMA = {
    "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
}
# By hand (head_dim 64 / 4 = 16, so k and v project to 2 * 16 = 32): per layer q 64*64, k 64*32, v 64*32,
# o 64*64, gate/up/down 3 * 64*176, two RMSNorms 2 * 64; embeddings 1000*64, an untied head 1000*64, a final norm 64.
SMALL_LLAMA_PARAMS = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 11264 + 128) + 64000 + 64000 + 64


def test_estimate_cli_counts_a_llama_config(tmp_path, capsys) -> None:  # noqa: ANN001
    assert SMALL_LLAMA_PARAMS == 220_480
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_LLAMA))
    assert main(["estimate", "--config", str(path), "--world-size", "2", "--stage", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_params"] == SMALL_LLAMA_PARAMS
    zero = out["estimates"]["ZeroAdam int8"]
    assert zero["gpu"]["params"] == 2 * SMALL_LLAMA_PARAMS  # bf16 parameters, not sharded at stage 2
    assert main(["estimate", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{SMALL_LLAMA_PARAMS:,} parameters" in text


def test_estimate_cli_table(capsys) -> None:  # noqa: ANN001
    argv = ["estimate", "--params", "7e9", "--world-size", "8", "--stage", "3", "--state-dtype", "int8"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for needle in ["ZeroAdam int8", "DDP + AdamW", "DeepSpeed ZeRO-3", "params", "grads", "moments", "master", "buffers"]:
        assert needle in text
    for card, _ in CARDS:
        assert card in text
    assert main(argv + ["--offload", "cpu", "--master-weights", "compact", "--gpu-memory-gib", "32", "--bucket-size",
                        "1000000"]) == 0
    text = capsys.readouterr().out
    assert "per host" in text and "custom-32" in text
    assert main(["estimate", "--params", "lots"]) == 2
    assert "invalid params='lots'" in capsys.readouterr().err
