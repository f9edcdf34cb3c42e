"""The stochastic rounding of bf16 moments (zeroadam.formats.state.round_bf16_bits, Moments.store): exact
probabilities, special values, and the one hash shared by exp_avg and exp_avg_sq."""
import torch

from zeroadam.formats.state import Moments, hash_bits, round_bf16_bits


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16).to(torch.int32) & 0xFFFF


def test_up_with_probability_of_the_dropped_fraction_exactly() -> None:
    """Over all 2**16 values of the random bits, |x| rounds up one bf16 step exactly (dropped bits) times."""
    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.randn(6, generator=gen) * 10.0 ** torch.arange(-3, 3), torch.tensor([1.0, -2.5, 1e-40])])
    r = torch.arange(65536, dtype=torch.int64)
    for x in xs:
        a = int(x.abs().view(torch.int32))
        out = _bits(round_bf16_bits(x.expand(65536).contiguous(), r))
        lo = (a >> 16) | (0x8000 if x < 0 else 0)
        ups = int((out == lo + 1).sum())
        assert ups == a & 0xFFFF, (float(x), ups)
        assert int((out == lo).sum()) == 65536 - ups
    # Unbiased in value: the mean over every r is the fp32 x itself (the fp64 sum of these bf16 values is exact).
    x = torch.full((65536,), 0.1234567)
    assert float(round_bf16_bits(x, r).double().mean()) == float(x[0])


def test_special_values() -> None:
    above_max = torch.tensor([0x7F7F0001], dtype=torch.int32).view(torch.float32)  # just above bf16's largest
    x = torch.cat([torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")]), above_max, torch.tensor([1e-45])])
    r = torch.full((x.numel(),), 0xFFFF, dtype=torch.int64)
    out = round_bf16_bits(x, r)
    assert _bits(out).tolist()[:5] == [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0]
    assert out[5] == float("inf")  # above bf16's largest finite value, rounded up: inf, as the bits say
    assert _bits(out)[6] == 1  # the smallest subnormal rounds up to bf16's smallest subnormal
    assert _bits(round_bf16_bits(x, torch.zeros_like(r)))[6] == 0  # ... or down to zero


def test_moments_share_one_hash() -> None:
    """exp_avg uses the high 16 bits of the exp_avg stream's hash, exp_avg_sq its low 16 bits; seed_v draws
    nothing; the two decisions are uncorrelated."""
    n, base, seed = 50_000, 3 * 256, 0x1234567
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(n, generator=gen)
    v = torch.rand(n, generator=gen)
    mom = Moments.zeros("bf16", n, torch.device("cpu"))
    mom.store(m, v, index_base=base, seed_m=seed, seed_v=99)
    h = hash_bits(base, n, seed, torch.device("cpu"))
    assert torch.equal(mom.exp_avg, round_bf16_bits(m, h >> 16))
    assert torch.equal(mom.exp_avg_sq, round_bf16_bits(v, h & 0xFFFF))
    other = Moments.zeros("bf16", n, torch.device("cpu"))
    other.store(m, v, index_base=base, seed_m=seed, seed_v=7)
    assert torch.equal(other.exp_avg_sq, mom.exp_avg_sq)
    # Values halfway between two bf16 numbers: each rounds up with probability 1/2, independently of the other.
    half = torch.full((n,), 1.0 + 2.0**-8)
    mom.store(half, half, index_base=base, seed_m=seed, seed_v=0)
    up_m = (mom.exp_avg.float() > half).double()
    up_v = (mom.exp_avg_sq.float() > half).double()
    assert abs(float(up_m.mean()) - 0.5) < 0.01 and abs(float(up_v.mean()) - 0.5) < 0.01
    assert abs(float(((up_m - up_m.mean()) * (up_v - up_v.mean())).mean())) < 0.01
