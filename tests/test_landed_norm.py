"""The step's gradient norm taken where reduced gradients land (zeroadam/engines/grad_norm.py, [Note: the norm
where gradients land]): the fused add + sum of squares kernel against torch, the tracker's bookkeeping, and at
stages 1-3 (2 and 3 gloo ranks, accumulation, no_sync, 8-bit and bf16 gradients, offload) the landed norm equal to
a pass over the shards, taken without that pass, and a non-finite gradient on one rank still skipping the step on
every rank with parameters and state untouched."""
from __future__ import annotations

import math

import pytest
import torch

import zeroadam
from distributed import ranks_once
from test_zero3 import BATCH, data, groups, loss_of, make
from zeroadam import ZeroAdam
from zeroadam.engines import grad_norm
from zeroadam.engines.grad_norm import ShardNorm
from zeroadam.kernels import cpu as cpu_kernels
from zeroadam.update.dispatch import grads_sq_sum, land_sq_sum

needs_kernel = pytest.mark.skipif(cpu_kernels.compiled_kernel() is None, reason="the compiled CPU kernel is unavailable")


# ---------------------------------------------------------------- the kernel
@needs_kernel
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 1 / 3])
@pytest.mark.parametrize("n", [1, 17, 256 * 64 + 5, 100_003])
def test_add_sq_sum_is_torch_add_then_fp64_sum(dst_dtype, src_dtype, alpha, n) -> None:
    g = torch.Generator().manual_seed(n)
    dst = torch.randn(n, generator=g).to(dst_dtype)
    src = torch.randn(n, generator=g).to(src_dtype)
    want = dst.clone().add_(src, alpha=alpha)
    version = dst._version
    got = land_sq_sum(dst, src, alpha)
    assert torch.equal(dst, want)  # bit for bit torch's add_ (or torch's own add_ where the kernel declines)
    assert float(got) == pytest.approx(float((want.double() ** 2).sum()), rel=1e-12)
    assert dst._version > version  # an in-place write, as the trackers see it


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 1 / 3])
def test_scale_sq_sum_is_torch_mul(dtype, alpha) -> None:
    dst = torch.randn(10_007).to(dtype)
    want = dst.clone().mul_(alpha)
    got = cpu_kernels.add_sq_sum_compiled(dst, None, alpha)
    assert torch.equal(dst, want)
    assert got == pytest.approx(float((want.double() ** 2).sum()), rel=1e-12)


@needs_kernel
@pytest.mark.parametrize("where", [0, 15, 16, 4095, 70_000, 99_999])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_add_sq_sum_non_finite_anywhere_and_near_fp32_max(where: int, bad: float) -> None:
    dst = torch.randn(100_000)
    src = torch.randn(100_000)
    src[where] = bad
    assert not math.isfinite(cpu_kernels.add_sq_sum_compiled(dst, src, 0.5))
    big = torch.full((1000,), 3.0e38)
    s = cpu_kernels.add_sq_sum_compiled(big, torch.zeros(1000), 1.0)
    assert math.isfinite(s) and s == pytest.approx(1000 * (3.0e38) ** 2, rel=1e-6)  # fp64: no finite square overflows


def test_add_sq_sum_declines_what_it_cannot_take() -> None:
    dst = torch.zeros(8, 8).t()  # not contiguous
    assert cpu_kernels.add_sq_sum_compiled(dst, torch.ones(8, 8), 1.0) is None
    assert cpu_kernels.add_sq_sum_compiled(torch.zeros(4, dtype=torch.float16), torch.ones(4), 1.0) is None
    assert cpu_kernels.add_sq_sum_compiled(torch.zeros(4), torch.ones(5), 1.0) is None
    assert torch.equal(dst, torch.zeros(8, 8))
    # land_sq_sum then takes torch's add_ and a pass
    d16 = torch.zeros(4, dtype=torch.float16)
    assert float(land_sq_sum(d16, torch.ones(4), 0.5)) == pytest.approx(1.0)


# ---------------------------------------------------------------- the tracker
def test_tracker_keeps_the_latest_sum_of_each_range() -> None:
    shard = torch.zeros(1000)
    norm = ShardNorm(shard)
    a, b = torch.randn(300), torch.randn(500)
    norm.land(0, a, 0.5)
    norm.land(300, b, 0.5)
    norm.land(0, a, 0.5)  # accumulation: the range lands again, its sum is that of the accumulated values
    assert float(norm.sq_sum()) == pytest.approx(float((shard.double() ** 2).sum()), rel=1e-12)
    assert float(shard[:300].sub(a).abs().max()) < 1e-6


def test_tracker_drops_its_sums_when_the_shard_is_written_elsewhere() -> None:
    shard = torch.zeros(1000)
    norm = ShardNorm(shard)
    norm.land(0, torch.randn(1000), 1.0)
    shard.narrow(0, 10, 5).mul_(2.0)  # GradScaler's unscale, a replica average, a user: anything in place
    assert norm.sq_sum() is None
    norm.land(0, torch.randn(1000), 1.0)  # a whole-shard landing describes the shard again (stage 3)
    assert float(norm.sq_sum()) == pytest.approx(float((shard.double() ** 2).sum()), rel=1e-12)
    shard[0] = 1.0
    norm.land(500, torch.randn(500), 1.0)  # a part landing cannot vouch for the rest
    assert norm.sq_sum() is None
    shard.zero_()
    norm.reset()
    assert float(norm.sq_sum()) == 0.0
    assert norm.sq_sum(torch.zeros(1000)) is None  # another tensor than the one tracked
    assert ShardNorm(torch.ones(3), exact=False).sq_sum() is None


# ---------------------------------------------------------------- stages 1-3
def _shards(opt: ZeroAdam, stage: int) -> list[tuple[torch.Tensor, object]]:
    eng = opt.engine
    if stage == 3:
        return [(f.grad_shard, f.grad_norm()) for f in eng.flats if f.grad_shard is not None]
    return [(sp.grad_shard, sp.sink.norm) for sp in eng.spaces]


def _train(rank: int, world: int, stage: int, *, micro: int = 1, steps: int = 3, no_sync: bool = False,
           bad_step: int = -1, scale: bool = False, **kw) -> dict:
    model = make()
    if stage == 3:
        model = zeroadam.shard_model(model, offload_params=kw.pop("offload_params", False))
    opt = ZeroAdam(groups(model), lr=1e-2, stage=stage, bucket_size=3000, max_grad_norm=1.0, **kw)
    per = BATCH // world
    passes = []
    count = grad_norm.grads_sq_sum
    grad_norm.grads_sq_sum = lambda gs: (passes.append(len(gs)), count(gs))[1]  # type: ignore[assignment]
    out: dict = {"landed": [], "pass": [], "exact": [], "passes": [], "skipped": []}
    for step, mbs in enumerate(data(steps, micro)):
        opt.zero_grad()
        for i, (x, y) in enumerate(mbs):
            xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
            ctx = opt.no_sync() if no_sync and i < micro - 1 else _null()
            with ctx:
                loss = loss_of(model, xs, ys) / micro
                if step == bad_step and rank == world - 1 and i == micro - 1:
                    loss = loss * float("nan")
                loss.backward()
        opt.engine.before_step()  # the reduction (stage 1 reduces here)
        if scale:
            opt.engine.scale_grads(0.5)  # what GradScaler.unscale_ does: written elsewhere, a pass follows
        shards = _shards(opt, stage)
        out["exact"].append(all(n is not None and n.sq_sum(s) is not None for s, n in shards))
        del passes[:]
        out["landed"].append(float(opt.engine.local_grad_sq_sum()))
        out["passes"].append(sum(passes))
        out["pass"].append(float(count([s for s, _ in shards])))
        if step == bad_step:  # (state_dict is collective: every rank takes it)
            before = _params(model, stage)
            state_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
        opt.step()
        out["skipped"].append(opt.skipped_steps)
        if step == bad_step:
            out["untouched"] = all(torch.equal(a, b) for a, b in zip(before, _params(model, stage)))
            after = opt.state_dict()["state"][0]
            out["state_untouched"] = all(torch.equal(v, after[k]) for k, v in state_before.items())
    grad_norm.grads_sq_sum = count  # type: ignore[assignment]
    return out


def _params(model: torch.nn.Module, stage: int) -> list[torch.Tensor]:
    if stage == 3:  # gathered (collective): stage-3 parameters hold no values between uses
        return [t.clone() for t in zeroadam.full_state_dict(model).values()]
    return [t.detach().clone() for t in model.parameters()]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


CASES = {
    "stage1": dict(stage=1),
    "stage1_accum": dict(stage=1, micro=2),
    "stage2": dict(stage=2),
    "stage2_accum": dict(stage=2, micro=3),
    "stage2_no_sync": dict(stage=2, micro=2, no_sync=True),
    "stage2_int8_grads": dict(stage=2, quantized_gradients=True),
    "stage2_bf16_grads": dict(stage=2, grad_dtype="bf16", micro=2),
    "stage2_offload": dict(stage=2, offload="cpu", micro=2),
    "stage3": dict(stage=3),
    "stage3_accum": dict(stage=3, micro=2),
    "stage3_int8_grads": dict(stage=3, quantized_gradients=True, micro=2),
    "stage3_offload_params": dict(stage=3, offload="cpu", offload_params=True, micro=2),
}


def suite(rank: int, world: int) -> dict:
    out = {name: _train(rank, world, **case) for name, case in CASES.items()}
    out["scaled"] = _train(rank, world, 2, scale=True)
    for stage in (1, 2, 3):
        out[("nan", stage)] = _train(rank, world, stage, micro=2, bad_step=1)
    return out


def results(world: int) -> list[dict]:
    return ranks_once(suite, world)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_landed_norm_is_the_shards_norm_without_a_pass(world: int, case: str) -> None:
    for r in results(world):
        res = r[case]
        assert all(res["exact"]), res["exact"]
        assert res["passes"] == [0] * len(res["passes"])  # the step read no gradient shard for its norm
        for landed, full in zip(res["landed"], res["pass"]):
            assert landed == pytest.approx(full, rel=1e-10)


@pytest.mark.parametrize("world", [2])
def test_a_shard_written_after_landing_gets_a_pass(world: int) -> None:
    for r in results(world):
        res = r["scaled"]
        assert not any(res["exact"])
        assert all(p > 0 for p in res["passes"])
        for landed, full in zip(res["landed"], res["pass"]):
            assert landed == pytest.approx(full, rel=1e-10)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_non_finite_on_one_rank_skips_the_step_everywhere(world: int, stage: int) -> None:
    for r in results(world):
        res = r[("nan", stage)]
        assert not math.isfinite(res["landed"][1])  # every rank's global norm is non-finite...
        assert res["untouched"] and res["state_untouched"]  # ...and nothing was written
        assert res["skipped"] == [0, 1, 1]
        assert all(math.isfinite(x) for x in res["landed"][2:])  # the next step runs


def test_sum_of_keeps_fp64() -> None:
    """Squares of finite values over 1.8e19 overflow fp32: the landed sums add up in fp64."""
    big = torch.tensor(1e77, dtype=torch.float64)
    total = grad_norm.sum_of([1e77, big, torch.tensor(2.0, dtype=torch.float32)], torch.device("cpu"))
    assert total.dtype == torch.float64 and math.isfinite(float(total)) and float(total) == pytest.approx(2e77)
