import json

import pytest
import torch

from commvq.data import kvstore
from commvq.data.kvstore import KVStore, KVStoreWriter


def _writer(root, **kw):
    args = dict(kind="key", num_layers=2, width=6, dtype=torch.float32, settings={"model": "m"})
    args.update(kw)
    return KVStoreWriter(root, **args)


def _fill(w, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [[], []]
    for n in sizes:
        shard = []
        for layer in range(2):
            x = torch.randn(n, 6, generator=g)
            data[layer].append(x)
            shard.append({"x": x})
        w.write_shard(shard)
    return [torch.cat(d) for d in data]


def test_round_trip_across_shards(tmp_path):
    w = _writer(tmp_path / "k")
    data = _fill(w, [5, 3, 7])
    w.finish(exhausted=False)
    store = KVStore(tmp_path / "k")
    assert store.num_tokens == 15 and store.num_layers == 2 and store.width == 6
    for layer in range(2):
        ld = store.layer(layer)
        assert len(ld) == 15
        assert torch.equal(ld.read(), data[layer])
        assert torch.equal(ld.read(4, 9), data[layer][4:9])  # spans three shards
        pieces = [x for _, x in ld.shard_chunks(chunk=2)]
        assert torch.equal(torch.cat(pieces), data[layer])
        assert ld.num_chunks(2) == len(pieces)
        assert torch.equal(torch.cat([x for _, x in ld.shard_chunks(4, limit=6)]), data[layer][:6])


def test_bfloat16_storage_is_exact_for_bfloat16_input(tmp_path):
    w = _writer(tmp_path / "k", dtype=torch.bfloat16)
    x = torch.randn(4, 6).bfloat16()
    w.write_shard([{"x": x}, {"x": x}])
    assert torch.equal(KVStore(tmp_path / "k").layer(1).read(), x)


def test_writer_resumes_from_manifest(tmp_path):
    data = _fill(_writer(tmp_path / "k"), [4, 4])
    w2 = _writer(tmp_path / "k")
    assert w2.num_tokens == 8
    more = _fill(w2, [3], seed=5)
    assert torch.equal(KVStore(tmp_path / "k").layer(0).read(), torch.cat([data[0], more[0]]))


def test_incompatible_settings_are_refused(tmp_path):
    _fill(_writer(tmp_path / "k"), [2])
    with pytest.raises(ValueError, match="model='m'"):
        _writer(tmp_path / "k", settings={"model": "other"})
    with pytest.raises(ValueError, match="dtype"):
        _writer(tmp_path / "k", dtype=torch.bfloat16)


def test_foreign_folder_is_never_used_or_deleted(tmp_path):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        _writer(tmp_path / "k")
    with pytest.raises(ValueError, match="not a commvq KV store"):
        kvstore.remove_store(tmp_path / "k")
    assert (tmp_path / "k" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("inside", ["L000/notes.txt", "L000/00000.safetensors.bak", "notes.txt"])
def test_a_foreign_file_beside_shard_files_still_refuses_the_folder(tmp_path, inside):
    (tmp_path / "k" / "L000").mkdir(parents=True)
    (tmp_path / "k" / "L000" / "00000.safetensors").write_bytes(b"x")
    (tmp_path / "k" / inside).write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        _writer(tmp_path / "k")
    with pytest.raises(ValueError, match="not a commvq KV store"):
        kvstore.remove_store(tmp_path / "k")
    assert (tmp_path / "k" / inside).read_text() == "keep me"


def test_shard_files_left_before_the_first_manifest_are_written_over(tmp_path):
    """A run killed while writing its first shard leaves shard files and no manifest: the next
    writer starts the store afresh instead of refusing the folder."""
    (tmp_path / "k" / "L001").mkdir(parents=True)
    (tmp_path / "k" / "L001" / "00000.safetensors").write_bytes(b"half")
    (tmp_path / "k" / "L001" / ".00001.safetensors.tmp").write_bytes(b"")
    w = _writer(tmp_path / "k")
    assert w.num_tokens == 0 and not (tmp_path / "k" / "L001").exists()
    _fill(w, [2])
    assert KVStore(tmp_path / "k").num_tokens == 2


def test_truncate_and_stale_tmp_cleanup(tmp_path):
    w = _writer(tmp_path / "k")
    data = _fill(w, [2, 2, 2])
    w.truncate(1)
    stale = tmp_path / "k" / "L000" / ".00001.safetensors.999.tmp"
    stale.write_bytes(b"half")
    w2 = _writer(tmp_path / "k")
    assert w2.num_tokens == 2 and not stale.exists()
    assert torch.equal(KVStore(tmp_path / "k").layer(0).read(), data[0][:2])


def test_corrupt_or_missing_shard_names_the_file(tmp_path):
    _fill(_writer(tmp_path / "k"), [3, 3])
    path = kvstore.shard_file(tmp_path / "k", 1, 0)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=str(path)):
        KVStore(tmp_path / "k").layer(1).read()
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        KVStore(tmp_path / "k").layer(1).read()


def test_shape_mismatch_with_manifest_is_corrupt(tmp_path):
    _fill(_writer(tmp_path / "k"), [3])
    man = json.loads((tmp_path / "k" / "manifest.json").read_text())
    man["shards"][0]["tokens"] = 4
    (tmp_path / "k" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="manifest says"):
        KVStore(tmp_path / "k").layer(0).read()


def test_missing_store_and_bad_layer(tmp_path):
    with pytest.raises(FileNotFoundError, match="commvq collect"):
        KVStore(tmp_path / "none")
    _fill(_writer(tmp_path / "k"), [1])
    with pytest.raises(ValueError, match="layer=5"):
        KVStore(tmp_path / "k").layer(5)


def test_extra_tensors_travel_with_the_shard(tmp_path):
    w = _writer(tmp_path / "q", kind="query")
    pos = torch.arange(3, dtype=torch.int32)
    w.write_shard([{"x": torch.randn(3, 6), "pos": pos}] * 2)
    assert torch.equal(KVStore(tmp_path / "q").layer(0).read(name="pos"), pos)
