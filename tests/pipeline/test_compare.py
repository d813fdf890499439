import json

import pytest
import torch

from commvq import io, rope
from commvq.codecs.key_codebook import KeyCodebook
from commvq.evals.keys import key_errors, pair_energy, pair_weights
from commvq.pipeline import compare, train_keys
from commvq.pipeline.compare import CompareConfig
from commvq.pipeline.train_keys import TrainKeysConfig


def test_rotation_averaged_logit_error_identity():
    """mean over random relative positions of (q . R e)^2 == sum_f |q_f|^2 |e_f|^2 / 2."""
    torch.manual_seed(0)
    d = 16
    q, e = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    freqs = rope.inv_freq(d, 1e4).double()
    pos = torch.randint(0, 10**7, (200_000,))
    cos, sin = rope.cos_sin(freqs, pos)
    mc = ((rope.apply_rope(e.expand(len(pos), d), cos, sin) @ q) ** 2).mean()
    closed = (pair_energy(q[None], 1) * pair_energy(e[None], 1)).sum() / 2
    assert abs(float(mc / closed) - 1) < 0.02


def test_pair_weights_average_the_gqa_group():
    q = torch.randn(10, 4 * 8)
    w = pair_weights(q, num_kv_heads=2, head_dim=8)
    energy = pair_energy(q, 4).mean(0)  # [4 heads, 4 pairs]
    assert torch.allclose(w, torch.stack([energy[:2].mean(0), energy[2:].mean(0)]))


def test_key_errors_of_exact_and_zero_codebooks():
    k = torch.randn(64, 16)
    zero = KeyCodebook(torch.zeros(2, 1, 16, 4), code_bits=6)
    err = key_errors(k, zero, torch.ones(2, 4))
    assert abs(err["relative_mse"] - 1) < 1e-6 and abs(err["relative_logit_error"] - 1) < 1e-6


def test_compare_two_directories_on_held_out_keys(key_dir, tmp_path):
    for r in (1, 3):
        train_keys.run(
            TrainKeysConfig(
                key_dir=key_dir,
                output_dir=tmp_path / f"r{r}",
                code_bits=6,
                residuals=r,
                max_iters=4,
                num_samples=200,
                device="cpu",
                layers="0-1",
            )
        )
    out = compare.run(
        CompareConfig(
            dirs=[tmp_path / "r1", tmp_path / "r3"],
            key_dir=key_dir,
            output=tmp_path / "cmp",
            device="cpu",
        )
    )
    report = json.loads((out / "compare.json").read_text())
    assert report["eval_rows"] == [200, 300] and report["query_weighted"]
    assert [r["layer"] for r in report["rows"]] == [0, 1]
    for row in report["rows"]:
        assert row["r3"]["relative_mse"] < row["r1"]["relative_mse"] < 1
        assert 0 < row["r3"]["relative_logit_error"] < 1
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "relative_logit_error" in (out / "compare.md").read_text()
    # a rerun with nothing changed scores nothing and keeps the report; a retrained folder reruns
    cfg = CompareConfig(
        dirs=[tmp_path / "r1", tmp_path / "r3"], key_dir=key_dir, output=out, device="cpu"
    )
    scored = []
    real = compare.key_errors
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "key_errors", lambda *a, **k: scored.append(1) or real(*a, **k))
        before = (out / "compare.json").read_bytes()
        compare.run(cfg)
        assert not scored and (out / "compare.json").read_bytes() == before
        meta = tmp_path / "r1" / "config.json"
        meta.write_text(meta.read_text().replace('"samples"', '"samples" ', 1))
        compare.run(cfg)
        assert scored


def test_layers_of_mixed_runs_are_scored_on_rows_they_never_saw(key_dir, tmp_path):
    out = tmp_path / "cb"
    for layer, n in (("0", 256), ("1", 200)):  # a later run with fewer --num_samples, same folder
        train_keys.run(
            TrainKeysConfig(
                key_dir=key_dir,
                output_dir=out,
                code_bits=6,
                residuals=2,
                max_iters=2,
                num_samples=n,
                device="cpu",
                layers=layer,
            )
        )
    conf = json.loads((out / "config.json").read_text())
    assert (
        conf["samples"] == 200 and conf["layers"]["0"]["samples"] == 256
    )  # each layer keeps its own record
    report = json.loads(
        (
            compare.run(
                CompareConfig(dirs=[out], key_dir=key_dir, output=tmp_path / "cmp", device="cpu")
            )
            / "compare.json"
        ).read_text()
    )
    assert report["eval_rows"] == "per layer"
    assert [r["eval_rows"] for r in report["rows"]] == [
        [256, 300],
        [200, 300],
    ]  # never a row a layer trained on
    from commvq.data.kvstore import KVStore
    from commvq.spec import ModelSpec

    store = KVStore(key_dir)
    cb = io.load_key_codebook(out, 0, ModelSpec.from_dict(store.settings["spec"]))
    want = key_errors(store.layer(0).read(256, 300), cb)["relative_mse"]
    assert abs(report["rows"][0]["cb"]["relative_mse"] - want) < 1e-6


def test_column_names_tell_same_named_directories_apart(tmp_path):
    a, b, c = (
        tmp_path / "x" / "codebook_8bits",
        tmp_path / "y" / "codebook_8bits",
        tmp_path / "y" / "other",
    )
    assert compare.column_names([a, c]) == ["codebook_8bits", "other"]
    assert compare.column_names([a, b, c]) == ["x/codebook_8bits", "y/codebook_8bits", "y/other"]


def test_a_held_out_split_store_is_all_held_out(key_dir):
    from commvq.data.kvstore import KVStore

    store = KVStore(key_dir)
    assert compare.eval_range(store, 200, 100) == (200, 300)
    store.settings = {**store.settings, "split": "heldout"}
    assert compare.eval_range(store, 10**6, 100) == (0, 100)
