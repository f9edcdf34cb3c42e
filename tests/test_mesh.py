"""Hybrid sharding on a 2-D ("replicate", "shard") mesh (zeroadam/comm/mesh.py), against one process of
torch.optim.AdamW on the global batch; two torchrun launches on loopback stand in for two machines."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_two_nodes
from helpers import max_rel_err
from test_zero import CLIP, reference

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mesh")
    run_two_nodes(str(HERE / "mesh_train.py"), [str(out), "1", "2", "3"])
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_2x2_mesh_matches_adamw_on_global_batch(two_nodes: Path, stage: int) -> None:
    ref = reference(10, 2, CLIP)
    results = [torch.load(two_nodes / f"stage{stage}_rank{r}.pt") for r in range(4)]
    for res in results:
        assert max_rel_err(res["params"], ref) <= 1e-5
    for res in results[1:]:
        assert max_rel_err(res["params"], results[0]["params"]) == 0.0
    comm = results[0]["comm"]
    assert set(comm["by_dim"]) == {"shard", "replicate"}
    assert comm["by_dim"]["replicate"]["bytes"]["all_reduce"] > 0
