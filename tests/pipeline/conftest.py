"""A toy collected-KV store shared by the key-training and comparison tests."""

import pytest
import torch

from commvq.data.kvstore import KVStoreWriter
from commvq.spec import ModelSpec

SPEC = ModelSpec(
    "llama",
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    hidden_size=32,
    max_position=128,
    rope_theta=1e4,
)


@pytest.fixture
def key_dir(tmp_path):
    """300 low-rank-ish key vectors per layer (so a few stages fit them), plus queries."""
    root = tmp_path / "data" / "key"
    settings = {"model": "toy", "spec": SPEC.to_dict()}
    w = KVStoreWriter(root, "key", 3, 16, torch.float32, settings=settings)
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 16, generator=g)
    for _ in range(2):
        w.write_shard(
            [
                {
                    "x": torch.randn(150, 4, generator=g) @ basis
                    + 0.05 * torch.randn(150, 16, generator=g)
                }
                for _ in range(3)
            ]
        )
    w.finish(False)
    q = KVStoreWriter(tmp_path / "data" / "query", "query", 3, 32, torch.float32, settings=settings)
    q.write_shard(
        [
            {
                "x": torch.randn(40, 32, generator=g) * torch.linspace(0.1, 3, 32),
                "pos": torch.arange(40, dtype=torch.int32),
            }
            for _ in range(3)
        ]
    )
    q.finish(False)
    return root
