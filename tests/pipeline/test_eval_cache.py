from pathlib import Path

import pytest

from commvq.pipeline import eval_cache
from commvq.pipeline.methods import Method


def _common(tmp_path, beam=None):
    return eval_cache.common_key(
        Method("commvq", tmp_path / "keys", None, beam), "embedded", "cpu", 128, 0
    )


def test_a_part_is_keyed_by_its_own_settings_and_the_files_that_decide_it(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "000_0.pt").write_bytes(b"codebook")
    (keys / "curve.png").write_bytes(b"plot")
    settings = {
        "ppl_tokens": 2048,
        "ppl_docs": 2,
        "ppl_chunk": 64,
        "ppl_prefill": 0,
        "lengths": "512",
        "depths": "0,1",
        "samples": 2,
        "seed": 0,
    }
    ppl = eval_cache.fingerprint(_common(tmp_path), "ppl", settings)
    needle = eval_cache.fingerprint(_common(tmp_path), "needle", settings)
    longer = {**settings, "lengths": "512,1024"}
    assert (
        eval_cache.fingerprint(_common(tmp_path), "ppl", longer) == ppl
    )  # retrieval settings: not perplexity's
    assert eval_cache.fingerprint(_common(tmp_path), "needle", longer) != needle
    prompt = {**settings, "ppl_prefill": 1024}
    assert eval_cache.fingerprint(_common(tmp_path), "ppl", prompt) != ppl
    assert eval_cache.fingerprint(_common(tmp_path, beam=8), "ppl", settings) != ppl
    (keys / "curve.png").write_bytes(b"another plot")  # plots do not decide results
    assert eval_cache.fingerprint(_common(tmp_path), "ppl", settings) == ppl
    (keys / "000_0.pt").write_bytes(b"retrained")
    assert eval_cache.fingerprint(_common(tmp_path), "ppl", settings) != ppl


def test_kept_parts_round_trip_and_a_damaged_file_is_recomputed(tmp_path):
    kept = eval_cache.load(tmp_path, "kivi2")
    assert kept == {}
    eval_cache.store(tmp_path, "kivi2", kept, "ppl", "abc", {"model": "m", "result": {"ppl": 30.0}})
    eval_cache.store(
        tmp_path, "kivi2", kept, "bytes", "def", {"model": "m", "result": {"key_bits": 3.0}}
    )
    again = eval_cache.load(tmp_path, "kivi2")
    assert eval_cache.hit(again, "ppl", "abc")["result"] == {"ppl": 30.0}
    assert (
        eval_cache.hit(again, "ppl", "other") is None
        and eval_cache.hit(again, "needle", "abc") is None
    )
    Path(eval_cache.cache_file(tmp_path, "kivi2")).write_text('{"ppl": {"finger')  # torn
    assert eval_cache.load(tmp_path, "kivi2") == {}


def test_table_cells_name_the_dtype_and_count_the_probes():
    from commvq.pipeline.evaluate import bytes_cell, hits_cell, method_label

    cpu = {"bytes_per_token_layer": 1536.0, "fp16_bytes_per_token_layer": 768.0, "dtype": "float32"}
    assert method_label("fp16", cpu) == "fp16 (ran in float32)"
    assert bytes_cell(cpu) == "1536.0 (FP16: 768.0)"
    half = {**cpu, "bytes_per_token_layer": 768.0, "dtype": "float16"}
    assert method_label("fp16", half) == "fp16" and bytes_cell(half) == "768.0"
    small = {**cpu, "bytes_per_token_layer": 104.0}  # a compressed method on the same CPU
    assert method_label("commvq-e2e2", small) == "commvq-e2e2" and bytes_cell(small) == "104.0"
    grid = {(512, 0.0): 1.0, (512, 0.5): 0.5, (1024, 0.0): 0.0}
    assert hits_cell(0.5, grid, per_cell=2) == "50% (3/6)"
    assert hits_cell(0.5, None, per_cell=2) == "50%"


def test_the_model_dtype_keys_the_results_only_where_set(tmp_path):
    """``--model_dtype bfloat16`` (on a CPU) is another computation: another key; ``auto`` keeps
    the keys that runs before the option wrote."""
    method = Method("commvq", tmp_path / "keys", None, None)
    args = (method, "embedded", "cpu", 128, 0)
    settings = {"ppl_tokens": 2048, "ppl_docs": 2, "ppl_chunk": 64, "ppl_prefill": 0}
    before = eval_cache.fingerprint(eval_cache.common_key(*args), "ppl", settings)
    auto = eval_cache.fingerprint(eval_cache.common_key(*args, "auto"), "ppl", settings)
    bf16 = eval_cache.fingerprint(eval_cache.common_key(*args, "bfloat16"), "ppl", settings)
    assert auto == before != bf16


def test_eval_takes_a_model_dtype_and_refuses_an_unknown_one():
    from commvq.pipeline.evaluate import EvalConfig

    assert EvalConfig(model_dtype="bfloat16").model_dtype == "bfloat16"
    with pytest.raises(ValueError, match="model_dtype"):
        EvalConfig(model_dtype="float8")
