import pytest
import torch

from commvq.data.kvstore import KVStoreWriter, shard_file
from commvq.pipeline import scale
from commvq.pipeline.scale import ScaleConfig


def _store(root, kind, shards, width=5, layers=3):
    w = KVStoreWriter(root, kind, layers, width, torch.float32, settings={})
    for per_layer in shards:
        w.write_shard([{"x": x} for x in per_layer])
    w.finish(False)


def _random_shards(n_shards, rows, width=5, layers=3):
    return [
        [torch.randn(rows, width) * (layer + 1) for layer in range(layers)] for _ in range(n_shards)
    ]


def test_scale_matches_direct_computation(tmp_path):
    keys, values = _random_shards(3, 7), _random_shards(2, 4)
    _store(tmp_path / "data" / "key", "key", keys)
    _store(tmp_path / "data" / "value", "value", values)
    out = scale.run(ScaleConfig(key_dir=tmp_path / "data" / "key", chunk_tokens=3))
    assert out == tmp_path / "data" / "learnable_scale.pt"
    got = scale.load_scales(out)
    for kind, shards in (("key", keys), ("value", values)):
        assert sorted(got[kind]) == [0, 1, 2]
        for layer in range(3):
            direct = torch.cat([s[layer] for s in shards]).abs().mean(0)
            assert got[kind][layer].dtype == torch.float32
            assert torch.allclose(got[kind][layer], direct, atol=1e-6)
    assert (tmp_path / "data" / "learnable_scale.json").is_file()


def test_first_n_tokens_only(tmp_path):
    keys = _random_shards(3, 4)
    _store(tmp_path / "data" / "key", "key", keys)
    _store(tmp_path / "data" / "value", "value", keys)
    got = scale.load_scales(
        scale.run(ScaleConfig(key_dir=tmp_path / "data" / "key", num_samples=6))
    )
    assert torch.allclose(
        got["key"][1], torch.cat([s[1] for s in keys])[:6].abs().mean(0), atol=1e-6
    )


def test_nan_shard_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    keys = _random_shards(3, 4)
    keys[1][2][0, 3] = float("nan")
    _store(tmp_path / "data" / "key", "key", keys)
    _store(tmp_path / "data" / "value", "value", _random_shards(1, 4))
    got = scale.load_scales(
        scale.run(ScaleConfig(key_dir=tmp_path / "data" / "key", chunk_tokens=2))
    )
    bad = shard_file(tmp_path / "data" / "key", 2, 1)
    assert str(bad) in caplog.text
    direct = torch.cat([keys[0][2], keys[2][2]]).abs().mean(0)
    assert torch.allclose(got["key"][2], direct, atol=1e-6)
    assert torch.isfinite(got["key"][2]).all()


def test_no_finite_values_is_an_error(tmp_path):
    keys = _random_shards(1, 4)
    keys[0][0][0, 0] = float("inf")
    _store(tmp_path / "data" / "key", "key", keys)
    _store(tmp_path / "data" / "value", "value", _random_shards(1, 4))
    with pytest.raises(ValueError, match="layer 0 has no finite values"):
        scale.run(ScaleConfig(key_dir=tmp_path / "data" / "key"))
    assert not (tmp_path / "data" / "learnable_scale.pt").exists()


def test_missing_data_and_bad_scale_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="commvq collect"):
        scale.run(ScaleConfig(key_dir=tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="commvq scale"):
        scale.load_scales(tmp_path / "none.pt")
    torch.save({"k": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a scale file"):
        scale.load_scales(tmp_path / "bad.pt")
