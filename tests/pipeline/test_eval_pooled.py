import math

import pytest

from commvq.pipeline.evaluate import cell, pooled


def test_pooled_weighs_documents_by_their_tokens_and_keeps_each_documents_kl():
    docs = [{"nll": 30.0, "kl": 0.3, "tokens": 10}, {"nll": 60.0, "kl": 0.2, "tokens": 30}]
    r = pooled(docs)
    assert r["tokens"] == 40
    assert r["kl"] == pytest.approx(0.5 / 40)
    assert r["ppl"] == pytest.approx(math.exp(90.0 / 40))
    assert r["kl_docs"] == pytest.approx([0.03, 0.2 / 30])
    assert min(r["kl_docs"]) <= r["kl"] <= max(r["kl_docs"])


def test_cells_show_no_negative_zero():
    assert cell("{:.4f}", -1e-7) == "0.0000" and cell("{:.4f}", -0.002) == "-0.0020"
    assert cell("{:.0%}", -1e-9) == "0%" and cell("{:.3f}", 31.09133) == "31.091"
