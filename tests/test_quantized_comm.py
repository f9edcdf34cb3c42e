"""8-bit collectives (zeroadam/comm/quantized.py): the codec, the collectives on uneven world sizes, and training
with quantized_weights / quantized_gradients on a 2x2 mesh (4 spawned gloo ranks)."""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from helpers import max_rel_err
from zeroadam.comm.quantized import dequantize_blocks, padded, quantize_blocks
from zeroadam.options import BLOCK_SIZE


@pytest.mark.parametrize("n", [1, 255, 257, 3 * BLOCK_SIZE])
def test_codec_error_is_within_half_a_step_per_block(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-3, 3, n)
    codes, scales = quantize_blocks(x)
    assert codes.dtype == torch.int8 and codes.numel() == padded(n) and scales.numel() == padded(n) // BLOCK_SIZE
    y = dequantize_blocks(codes, scales, n)
    step = (scales / 127.0).repeat_interleave(BLOCK_SIZE)[:n]
    assert ((y - x).abs() <= step / 2 * (1 + 1e-6)).all()
    # The element that sets a block's scale comes back exactly.
    blocks = torch.nn.functional.pad(x, (0, padded(n) - n)).view(-1, BLOCK_SIZE)
    top = blocks.abs().argmax(dim=1) + torch.arange(blocks.shape[0]) * BLOCK_SIZE
    top = top[top < n]
    assert torch.equal(y[top], x[top])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_value_poisons_its_block_only(bad: float) -> None:
    x = torch.ones(3 * BLOCK_SIZE)
    x[BLOCK_SIZE + 7] = bad
    y = dequantize_blocks(*quantize_blocks(x), x.numel())
    assert torch.isnan(y[BLOCK_SIZE : 2 * BLOCK_SIZE]).all()
    assert torch.equal(y[:BLOCK_SIZE], x[:BLOCK_SIZE]) and torch.equal(y[2 * BLOCK_SIZE :], x[2 * BLOCK_SIZE :])


def collectives(rank: int, world: int) -> dict:
    from zeroadam.comm.collectives import CommStats, Group
    from zeroadam.comm.quantized import quantized_all_gather, quantized_all_reduce, quantized_reduce_scatter

    g = Group.resolve(None)
    stats = CommStats(world)
    gen = torch.Generator().manual_seed(100 + rank)
    full = torch.randn(1000, generator=gen)
    # Uneven pieces, one empty, starting on block boundaries.
    bounds = [0, 512, 512, 1000][: world] + [1000]
    ranges = [(bounds[r], bounds[r + 1]) for r in range(world)]
    a, b = ranges[rank]
    out = torch.empty(b - a)
    quantized_reduce_scatter(g, out, full, ranges, stats)
    shard = torch.randn(2 * BLOCK_SIZE, generator=gen)
    gathered = torch.empty(2 * BLOCK_SIZE * world)
    quantized_all_gather(g, gathered, shard, stats)
    gather_bytes = dict(stats.bytes)
    t = torch.randn(777, generator=gen)
    t_in = t.clone()
    quantized_all_reduce(g, t, stats)
    return {"full": full, "out": out, "shard": shard, "gathered": gathered, "t_in": t_in, "t": t,
            "ranges": ranges, "bytes": gather_bytes}


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_exact_ones_within_the_code_step(world: int) -> None:
    res = run_ranks(collectives, world)
    fulls = torch.stack([r["full"] for r in res])
    for rank, r in enumerate(res):
        a, b = r["ranges"][rank]
        exact = fulls[:, a:b].sum(0)
        assert r["out"].numel() == b - a  # an empty piece on 3 ranks
        assert ((r["out"] - exact).abs() <= world * fulls.abs().max() / 127).all()
    shards = torch.cat([r["shard"] for r in res])
    for r in res:
        assert torch.equal(r["gathered"], res[0]["gathered"])  # every rank decodes the same values
        assert (r["gathered"] - shards).abs().max() <= shards.abs().max() / 254 * 1.0001
    exact = torch.stack([r["t_in"] for r in res]).sum(0)
    for r in res:
        assert torch.equal(r["t"], res[0]["t"])
        assert (r["t"] - exact).abs().max() <= 3 * world * exact.abs().max() / 127
    # int8 codes plus one fp32 scale per 256 elements: about a quarter of fp32's bytes.
    assert res[0]["bytes"]["all_gather_int8"] == 2 * BLOCK_SIZE * world
    assert res[0]["bytes"]["all_gather_int8_scales"] == 2 * 4 * world


def train_quantized(rank: int, world: int) -> dict:
    import mesh_train
    from torch.distributed.device_mesh import init_device_mesh

    import zeroadam

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for stage in (1, 2, 3):
        for qw, qg in ((False, False), (True, False), (False, True), (True, True)):
            model = mesh_train.make_model()
            if stage == 3:
                zeroadam.shard_model(model, mesh=mesh, units=[torch.nn.Linear])
            opt = zeroadam.ZeroAdam(
                mesh_train.groups(model), lr=1e-2, weight_decay=0.0, state_dtype="fp32", stage=stage,
                max_grad_norm=mesh_train.CLIP, bucket_size=3000, mesh=mesh, quantized_weights=qw, quantized_gradients=qg,
            )
            mesh_train.run_steps(model, opt, rank, world, 0, mesh_train.STEPS)
            out[(stage, qw, qg)] = {"params": mesh_train.params_of(model, stage), "comm": opt.comm_stats()}
    return out


@pytest.fixture(scope="module")
def quantized_runs() -> list[dict]:
    return run_ranks(train_quantized, 4, timeout=300)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_quantized_training_stays_close_and_replicas_agree(quantized_runs: list[dict], stage: int) -> None:
    exact = quantized_runs[0][(stage, False, False)]["params"]
    for qw, qg in ((True, False), (False, True), (True, True)):
        runs = [r[(stage, qw, qg)] for r in quantized_runs]
        assert max_rel_err(runs[0]["params"], exact) <= 0.05, (qw, qg)
        if stage == 3 or not qw:
            for r in runs[1:]:  # the full parameters are the same on every rank
                assert max_rel_err(r["params"], runs[0]["params"]) == 0.0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_quantized_bytes(quantized_runs: list[dict], stage: int) -> None:
    runs = quantized_runs[0]
    plain = runs[(stage, False, False)]["comm"]
    qw = runs[(stage, True, False)]["comm"]
    qg = runs[(stage, False, True)]["comm"]
    gathered = plain["by_dim"]["shard"]["bytes"]["all_gather"]
    q_gathered = qw["by_dim"]["shard"]["bytes"]["all_gather_int8"] + qw["by_dim"]["shard"]["bytes"]["all_gather_int8_scales"]
    assert q_gathered <= 0.27 * gathered
    across = plain["by_dim"]["replicate"]["total_bytes"]
    q_across = qg["by_dim"]["replicate"]["total_bytes"]
    assert q_across <= 0.55 * across
