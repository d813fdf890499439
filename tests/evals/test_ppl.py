"""KL between two cache methods in lockstep (a coarse method against its exact mode)."""

import torch

from commvq.evals.ppl import ppl_kl
from commvq.integrations.hf import use_commvq
from commvq.integrations.hf.cache import CommVQCache
from commvq.integrations.hf.loader import load_model


def test_pair_kl_is_zero_between_equal_methods_and_positive_otherwise(tiny_llama):
    model = load_model(str(tiny_llama), device="cpu").model
    use_commvq(model)
    ids = torch.randint(1, 300, (1, 60), generator=torch.Generator().manual_seed(0))
    makers = {
        "fp16": lambda: CommVQCache.baseline(model, "fp16", window=8, group=4),
        "fp16 again": lambda: CommVQCache.baseline(model, "fp16", window=8, group=4),
        "kivi1": lambda: CommVQCache.baseline(model, "kivi1", window=8, group=4),
    }
    pairs = {"fp16 again": "fp16", "kivi1": "fp16"}
    stats = ppl_kl(model, ids, makers, chunk=16, skip=8, pairs=pairs)
    assert stats["fp16 again"]["kl_pair"] == 0.0 and "kl_pair" not in stats["fp16"]
    assert stats["kivi1"]["kl_pair"] > 1e-4
    # the pair's KL equals the KL to the exact model where the reference is as exact
    assert abs(stats["kivi1"]["kl_pair"] - stats["kivi1"]["kl"]) < 0.05 * stats["kivi1"]["kl"]
