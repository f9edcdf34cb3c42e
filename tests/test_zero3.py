"""ZeRO stage 3: shard_model + ZeroAdam(stage=3) against one process of torch.optim.AdamW on the global batch."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import zeroadam
from distributed import run_ranks
from helpers import moment_tensors, force_host_copies, rel_err
from zeroadam import ZeroAdam

VOCAB, DIM, CTX, BATCH = 61, 72, 9, 6  # the global batch of 6 splits over 2 and 3 ranks


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 3 * DIM)
        self.down = nn.Linear(3 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """Input and output embeddings tied, as in GPT-2: one parameter used at both ends of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def make() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def groups(model: nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 2e-2}]


def data(steps: int, micro: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    return [
        [(torch.randint(0, VOCAB, (BATCH, CTX), generator=g), torch.randint(0, VOCAB, (BATCH, CTX), generator=g)) for _ in range(micro)]
        for _ in range(steps)
    ]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


STEPS, MICRO, CLIP = 10, 2, 1.0


def reference() -> list[torch.Tensor]:
    model = make()
    opt = torch.optim.AdamW(groups(model), lr=1e-2)
    for mbs in data(STEPS, MICRO):
        opt.zero_grad()
        for x, y in mbs:
            (loss_of(model, x, y) / MICRO).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train(model: nn.Module, rank: int, world: int, no_sync: bool = False, state_dtype: str = "fp32", **options) -> ZeroAdam:
    """The reference's loop on this rank's part of the global batch; with ``no_sync`` every micro-batch but the
    last runs under ``opt.no_sync()``."""
    per = BATCH // world
    opt = ZeroAdam(groups(model), lr=1e-2, state_dtype=state_dtype, stage=3, max_grad_norm=CLIP, **options)
    for mbs in data(STEPS, MICRO):
        opt.zero_grad()
        for i, (x, y) in enumerate(mbs):
            with opt.no_sync() if no_sync and i + 1 < MICRO else contextlib.nullcontext():
                (loss_of(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]) / MICRO).backward()
        opt.step()
    return opt


def whole_params(model: nn.Module) -> list[torch.Tensor]:
    full = zeroadam.full_state_dict(model)
    return [full[n] for n, _ in model.named_parameters()]


def suite(rank: int, world: int) -> dict:
    out: dict = {}
    ref_model = make()
    model = zeroadam.shard_model(make())
    st = model._zeroadam_sharded
    # The sharded forward equals the unsharded one (and names / shapes did not change).
    x0 = data(1, 1)[0][0][0]
    with torch.no_grad():
        out["forward_err"] = float((model(x0) - ref_model(x0)).abs().max())
    out["names_same"] = [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in ref_model.named_parameters()
    ]
    out["units"] = [u.name for u in st.units]
    st.peak_live_bytes = 0
    opt = train(model, rank, world)
    out["mem"] = opt.memory_stats()
    out["comm"] = opt.comm_stats()
    out["peak_live"] = st.peak_live_bytes
    out["unit_bytes"] = {u.name: sum(f.full_bytes for f in u.flats) for u in st.units}
    full = zeroadam.full_state_dict(model)
    out["params"] = [full[n] for n, _ in ref_model.named_parameters()]
    out["sd_keys_same"] = list(full) == list(ref_model.state_dict())
    # The optimizer state dict gathers the pieces into whole-parameter entries on rank 0; the others get theirs.
    sd = opt.state_dict()
    if rank == 0:
        out["state_shapes_ok"] = "shard" not in sd["zeroadam"] and all(
            moment_tensors(sd["state"][i])[0].shape == p.shape for i, p in enumerate(q for g in opt.param_groups for q in g["params"])
        )
    else:
        out["state_shapes_ok"] = sd["zeroadam"]["shard"]["rank"] == rank

    # Meta-device construction from rank 0's state dict, and from an init function.
    with torch.device("meta"):
        meta = TinyLM()
    sd0 = make().state_dict() if rank == 0 else None
    zeroadam.shard_model(meta, device="cpu", full_state_dict=sd0)
    with torch.no_grad():
        out["meta_err"] = float((meta(x0) - ref_model(x0)).abs().max())
    with torch.device("meta"):
        meta2 = TinyLM()
    zeroadam.shard_model(meta2, device="cpu", init_fn=lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    full2 = zeroadam.full_state_dict(meta2)
    out["init_fn_finite"] = all(torch.isfinite(t).all() for t in full2.values())
    out["init_fn_norm"] = float(full2["blocks.0.up.weight"].norm())

    # Bad input: a policy that selects nothing; full_state_dict of an unsharded model.
    for key, fn in (
        ("bad_policy", lambda: zeroadam.shard_model(make(), units=[nn.Conv2d])),
        ("not_sharded", lambda: zeroadam.full_state_dict(make())),
    ):
        try:
            fn()
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    return out


def eval_after_steps(rank: int, world: int, reshard_after_forward: bool) -> list[float]:
    """Per step: backward, a no_grad forward, the step, a no_grad forward again (the root unit, or with
    reshard_after_forward=False every unit, stays gathered after a no_grad forward). Every forward's output
    against the unsharded AdamW model's at the same point."""
    per = BATCH // world
    ref = make()
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    model = zeroadam.shard_model(make(), reshard_after_forward=reshard_after_forward)
    opt = ZeroAdam(groups(model), lr=1e-2, state_dtype="fp32", stage=3)
    probe = data(1, 1)[0][0][0]
    errs = []

    @torch.no_grad()
    def evaluate() -> None:
        errs.append(rel_err(model(probe), ref(probe)))

    for (x, y), in data(3, 1):
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        opt.zero_grad()
        loss_of(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]).backward()
        evaluate()  # leaves units gathered ...
        ref_opt.step()
        opt.step()
        evaluate()  # ... which must not serve this forward
    return errs


def edges(rank: int, world: int) -> dict:
    out: dict = {}
    # Every forward after a step sees the updated weights, whatever a previous forward left gathered.
    out["eval_errs"] = {raf: eval_after_steps(rank, world, raf) for raf in (True, False)}

    # A weight tied across units (the head is a unit of its own, its weight is the root's embedding) lives in
    # the root unit and trains like AdamW.
    model = zeroadam.shard_model(make(), units=[nn.Linear])
    st = model._zeroadam_sharded
    out["tied_unit"] = st.unit_of[model.head.weight][0].name
    train(model, rank, world)
    out["tied_params"] = whole_params(model)

    # no_sync: the held-back micro-batch communicates nothing; the last one reduce-scatters the sum once.
    model = zeroadam.shard_model(make())
    st = model._zeroadam_sharded
    opt = train(model, rank, world, no_sync=True)
    out["no_sync_params"] = whole_params(model)
    out["no_sync_reduced"] = opt.comm_stats()["elements"].get("reduce_scatter", 0)
    out["elements_per_pass"] = sum(f.layout.total for u in st.units for f in u.flats)

    # A frozen unit has no gradient to reduce-scatter.
    model = zeroadam.shard_model(make())
    st = model._zeroadam_sharded
    model.blocks[1].requires_grad_(False)
    st.stats.reset()
    x, y = data(1, 1)[0][0]
    loss_of(model, x, y).backward()
    out["frozen_reduced"] = st.stats.elements.get("reduce_scatter", 0)
    out["frozen_expected"] = sum(f.layout.total for u in st.units if u.name != "blocks.1" for f in u.flats)
    return out


_cache: dict[int, list[dict]] = {}
_edges_cache: list[list[dict]] = []


def edge_results() -> list[dict]:
    if not _edges_cache:
        _edges_cache.append(run_ranks(edges, 2, timeout=240))
    return _edges_cache[0]


def results(world: int) -> list[dict]:
    if world not in _cache:
        _cache[world] = run_ranks(suite, world, timeout=240)
    return _cache[world]


@pytest.fixture(scope="module")
def ref() -> list[torch.Tensor]:
    return reference()


@pytest.mark.parametrize("world", [2, 3])
def test_stage3_matches_adamw_on_global_batch(world: int, ref: list[torch.Tensor]) -> None:
    for r in results(world):
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(r["params"], ref))
        assert err <= 1e-5
        assert r["sd_keys_same"] and r["state_shapes_ok"]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_forward_keeps_names_and_values(world: int) -> None:
    for r in results(world):
        assert r["forward_err"] <= 1e-6 and r["names_same"]
        assert r["units"] == ["blocks.0", "blocks.1", "blocks.2", "<root>"]


@pytest.mark.parametrize("world", [2, 3])
def test_parameter_memory_is_one_nth(world: int) -> None:
    total = sum(p.numel() * 4 for p in make().parameters())
    for r in results(world):
        padding = len(r["unit_bytes"]) * world * 256 * 4
        assert r["mem"]["param_bytes"] <= total / world + padding  # between steps: the shard alone
        blocks = sorted((b for n, b in r["unit_bytes"].items() if n != "<root>"), reverse=True)
        # During forward: the root (embeddings, final norm) plus the running block and the prefetched one.
        assert r["peak_live"] <= r["unit_bytes"]["<root>"] + blocks[0] + blocks[1]


def test_stage3_communication_is_three_psi() -> None:
    world = 2
    psi = sum(p.numel() for p in make().parameters())
    for r in results(world):
        e = r["comm"]["elements"]
        moved = e["all_gather"] + e["reduce_scatter"] // MICRO  # reduce-scatter runs once per micro-batch
        # Per micro-batch: gather in forward and in backward (Psi each), reduce-scatter (Psi): 3 Psi.
        assert e["all_gather"] >= 2 * MICRO * psi * 0.99
        assert moved >= 3 * psi


@pytest.mark.parametrize("world", [2])
def test_meta_device_construction(world: int) -> None:
    for r in results(world):
        assert r["meta_err"] <= 1e-6
        assert r["init_fn_finite"] and r["init_fn_norm"] > 0


def test_bad_input_is_reported() -> None:
    for r in results(2):
        assert "selects no module" in r["bad_policy"]
        assert "not sharded" in r["not_sharded"]


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_forward_after_step_sees_updated_weights(reshard_after_forward: bool) -> None:
    for r in edge_results():
        errs = r["eval_errs"][reshard_after_forward]
        assert len(errs) == 6 and max(errs) <= 1e-5, errs


def test_weight_tied_across_units_lives_in_root_and_trains(ref: list[torch.Tensor]) -> None:
    for r in edge_results():
        assert r["tied_unit"] == "<root>"
        assert max(rel_err(a, b) for a, b in zip(r["tied_params"], ref)) <= 1e-5


def test_no_sync_defers_the_reduce_scatter(ref: list[torch.Tensor]) -> None:
    for r in edge_results():
        assert max(rel_err(a, b) for a, b in zip(r["no_sync_params"], ref)) <= 1e-5
        # One reduce-scatter per unit for the step's one synchronized backward, none for the held-back one.
        assert r["no_sync_reduced"] == r["elements_per_pass"]


def test_frozen_unit_is_not_reduce_scattered() -> None:
    for r in edge_results():
        assert r["frozen_reduced"] == r["frozen_expected"]


class BiasedHeadLM(TinyLM):
    """The tied head with a bias: with units=[nn.Linear] the weight goes to the root, the bias stays in the unit."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.emb.weight


class MixedDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.lin.bias = nn.Parameter(torch.zeros(DIM, dtype=torch.bfloat16))


def reset(m: nn.Module) -> None:
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()


@pytest.mark.parametrize("cls", [BiasedHeadLM, MixedDtypes])
def test_meta_init_fn_never_writes_a_released_buffer(cls: type) -> None:
    """init_fn runs on a module whose other parameters are already built (released) in another unit or dtype: it
    used to write through their zero-byte storage (a segfault). One process: construction needs no peers."""
    with torch.device("meta"):
        model = cls()
    zeroadam.shard_model(model, device="cpu", units=[nn.Linear], init_fn=reset)
    full = zeroadam.full_state_dict(model)
    assert all(torch.isfinite(t).all() for t in full.values())
    # Linear's reset_parameters draws both its weight and its bias: both filled, neither left at zero.
    assert all(full[n].abs().sum() > 0 for n in full if n.startswith(("lin.", "head.")))
    if cls is BiasedHeadLM:
        with torch.no_grad():
            assert torch.isfinite(model(data(1, 1)[0][0][0])).all()


def offload_chunked(rank: int, world: int) -> dict:
    # The GPU offload path on CPU tensors, as stages 1-2 test it (pieces moved in chunks of 512 elements).
    moved = force_host_copies(512)
    out = {}
    for fmt in ("fp32", "int8"):
        runs = []
        for opts in ({}, {"offload": "cpu"}):
            model = zeroadam.shard_model(make())
            train(model, rank, world, state_dtype=fmt, **opts)
            runs.append(whole_params(model))
        out[fmt] = runs
    out["most_chunks"] = max(-(-n // 512) for n in moved)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_offload_host_copies_in_chunks_equal_no_offload(world: int) -> None:
    for res in run_ranks(offload_chunked, world):
        assert res.pop("most_chunks") > 1  # a piece crossed chunk boundaries
        for fmt, (plain, off) in res.items():
            for a, b in zip(off, plain):
                assert float((a - b).norm() / b.norm()) <= 1e-6, fmt


def user_traps(rank: int, world: int) -> dict:
    """What nanoGPT-style code does with a sharded model: each must be a clear error, never a broken file, a crash
    of the process or a hang."""
    import torch.distributed as dist

    out: dict = {}
    model = zeroadam.shard_model(make())
    try:
        model.state_dict()
        out["state_dict"] = "no error"
    except RuntimeError as e:
        out["state_dict"] = str(e)
    out["full_still_works"] = len(zeroadam.full_state_dict(model)) == len(make().state_dict())
    try:
        torch.nn.parallel.DistributedDataParallel(model)
        out["ddp"] = "no error"
    except RuntimeError as e:
        out["ddp"] = str(e)
    # Evaluation on rank 0 alone while rank 1 goes on to something else (a barrier).
    x = data(1, 1)[0][0][0]
    if rank == 0:
        try:
            with torch.no_grad():
                model(x)
            out["eval"] = "no error"
        except RuntimeError as e:
            out["eval"] = str(e)
    else:
        try:
            dist.barrier()
        except RuntimeError:
            pass
        out["eval"] = ""
    return out


def test_sharded_model_traps_are_clear_errors() -> None:
    results = run_ranks(user_traps, 2, timeout=90, pg_timeout=5)
    for r in results:
        assert "zeroadam.full_state_dict(model) on every rank" in r["state_dict"]
        assert r["full_still_works"]
        assert "DistributedDataParallel is not needed" in r["ddp"]
    assert "Every rank runs every forward" in results[0]["eval"]
