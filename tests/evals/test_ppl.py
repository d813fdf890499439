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


def test_steps_cover_every_position_once_with_the_prompt_first():
    from commvq.evals.ppl import steps

    for n, chunk, prefill in [(59, 16, 0), (59, 16, 40), (59, 1, 58), (10, 4, 30)]:
        spans = steps(n, chunk, prefill)
        covered = [i for s, e in spans for i in range(s, e)]
        assert covered == list(range(n))
        if 0 < prefill < n:
            assert spans[0] == (0, prefill)
        assert all(e - s <= chunk for s, e in spans[1 if prefill else 0 :])


def test_prefill_scores_only_the_tokens_after_the_prompt(tiny_llama):
    model = load_model(str(tiny_llama), device="cpu").model
    use_commvq(model)
    ids = torch.randint(1, 300, (1, 60), generator=torch.Generator().manual_seed(1))
    makers = {"kivi1": lambda: CommVQCache.baseline(model, "kivi1", window=8, group=4)}
    fed = ppl_kl(model, ids, makers, chunk=1, skip=8, prefill=40)["kivi1"]
    assert fed["tokens"] == 59 - 40
    # a prompt is attended exactly: its tokens would have cost no KL, so the mean KL per scored
    # token is that of the decoded tail, above zero (kivi1 is lossy)
    assert fed["kl"] > 0
    whole = ppl_kl(model, ids, makers, chunk=1, skip=8)["kivi1"]
    assert whole["tokens"] == 59 - 8
