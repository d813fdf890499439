"""``benchmarks/coarse_floor.py``'s stand-in for the coarse step: exact attention, scaled."""

import sys
from pathlib import Path

import torch

from commvq.quant.coarse import CoarseSettings
from tests.integrations.test_coarse_decode import _filled

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_the_floor_step_is_the_exact_step_times_one_plus_eps(monkeypatch):
    import coarse_floor

    from commvq.integrations.hf import coarse_step

    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    exact, _ = _filled(None, t=140, stages=1)
    want = exact._mixed(q, None, 0.25)
    layer, _ = _filled(CoarseSettings(stages=1, keep=0.1, min_tokens=4, exact_layers=()), t=140)
    assert not torch.allclose(layer._mixed(q, None, 0.25), want)  # a budget drops tokens
    for eps in (0.0, 1e-3):
        applies, attend = coarse_floor.perturbed(eps)
        monkeypatch.setattr(coarse_step, "applies", applies)
        monkeypatch.setattr(coarse_step, "attend", attend)
        assert torch.allclose(layer._mixed(q, None, 0.25), want * (1 + eps), atol=1e-6)
        assert layer.coarse is not None  # the settings are back after the step


def test_the_floor_keeps_its_results_under_its_own_key(tmp_path):
    """A coarse method's cached results under the stand-in are keyed apart from a genuine coarse
    run's; exact methods keep their keys (their results are the same computation)."""
    import coarse_floor

    from commvq.pipeline import eval_cache
    from commvq.pipeline.methods import Method

    key = coarse_floor.keyed(eval_cache.common_key, 1e-6)
    exact = Method("commvq", tmp_path, None, None)
    coarse = Method("commvq+coarse", tmp_path, None, None, coarse=CoarseSettings(stages=1))
    args = ("embedded", "cpu", 128, 0)
    assert key(exact, *args) == eval_cache.common_key(exact, *args)
    assert key(coarse, *args) != eval_cache.common_key(coarse, *args)
