import json

import pytest
import torch

from commvq.data import corpus
from commvq.data.corpus import CorpusSource, batches, embedded_files, iter_documents, pack


def test_embedded_split_is_fixed_and_disjoint():
    train, held = embedded_files("train"), embedded_files("heldout")
    assert len(train) + len(held) == 249
    assert len(held) == 24  # every 10th speech, starting with the 10th
    assert not set(train) & set(held)
    everything = sorted(train + held)
    assert [everything.index(f) % 10 for f in held] == [9] * len(held)
    assert embedded_files("heldout") == held


def test_embedded_documents_never_include_heldout():
    held_texts = {f.read_text()[:200] for f in embedded_files("heldout")}
    docs = iter_documents(CorpusSource("embedded", split="train"))
    first = [next(docs)[:200] for _ in range(30)]
    assert not held_texts & set(first)


def test_document_order_depends_on_seed_only():
    a = [d[:50] for d in iter_documents(CorpusSource("embedded", seed=1))][:5]
    b = [d[:50] for d in iter_documents(CorpusSource("embedded", seed=1))][:5]
    c = [d[:50] for d in iter_documents(CorpusSource("embedded", seed=2))][:5]
    assert a == b and a != c


def test_local_txt_jsonl_parquet_and_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["delta", "", "epsilon"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    docs = sorted(iter_documents(CorpusSource(str(tmp_path))))
    assert docs == sorted(["alpha text", "beta", "gamma", "delta", "epsilon"])
    assert list(iter_documents(CorpusSource(str(tmp_path / "b.jsonl")))) == ["beta", "gamma"]


def test_jsonl_missing_field_names_it(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="text_field"):
        list(iter_documents(CorpusSource(str(tmp_path / "a.jsonl"))))


def test_missing_local_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_documents(CorpusSource(str(tmp_path / "nope.txt"))))
    with pytest.raises(ValueError, match="no .txt"):
        list(iter_documents(CorpusSource(str(tmp_path))))


def test_ranks_get_disjoint_slices_covering_everything(corpus_dir):
    whole = list(iter_documents(CorpusSource(str(corpus_dir))))
    parts = [list(iter_documents(CorpusSource(str(corpus_dir), rank=r, world=3))) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole)
    assert sum(len(p) for p in parts) == len(whole)


def test_pack_properties():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12]]
    seqs = list(pack(docs, 4, sep_id=0))
    flat = [t for d in docs for t in d + [0]]
    assert sum(seqs, []) == flat
    assert all(len(s) == 4 for s in seqs[:-1]) and 0 < len(seqs[-1]) <= 4
    with pytest.raises(ValueError):
        list(pack(docs, 0, 0))


def test_batches_group_equal_lengths_in_order():
    seqs = [[1] * 4, [2] * 4, [3] * 4, [4] * 2]
    out = list(batches(seqs, 2))
    assert [b.shape for b in out] == [torch.Size([2, 4]), torch.Size([1, 4]), torch.Size([1, 2])]
    assert torch.cat([b.flatten() for b in out]).tolist() == sum(seqs, [])


def test_auto_dataset_offline_falls_back_to_embedded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert corpus.resolve_dataset("auto") == "embedded"
    assert corpus.resolve_dataset("sotu") == "embedded"
    assert corpus.resolve_dataset("org/name") == "org/name"


def _folder_corpus(tmp_path, n=60):
    (tmp_path / "docs").mkdir()
    for i in range(n - 20):
        (tmp_path / "docs" / f"d{i:02d}.txt").write_text(f"document number {i}")
    (tmp_path / "docs" / "more.jsonl").write_text(
        "".join(json.dumps({"text": f"row {j}"}) + "\n" for j in range(20))
    )
    return tmp_path / "docs"


def test_local_corpora_have_a_fixed_heldout_split_by_document(tmp_path):
    root = _folder_corpus(tmp_path)
    train = list(iter_documents(CorpusSource(str(root), split="train")))
    held = list(iter_documents(CorpusSource(str(root), split="heldout")))
    assert not set(train) & set(held) and len(train) + len(held) == 60 and 1 <= len(held) <= 15
    for seed in (1, 2):  # the split is the same whatever the seed (which only orders the files)
        assert sorted(
            iter_documents(CorpusSource(str(root), split="heldout", seed=seed))
        ) == sorted(held)
    # a corpus too small to hold one held-out document refuses the held-out split
    (tmp_path / "one.txt").write_text("a single document")
    split = "train" if corpus.in_split("one.txt#0", "train") else "heldout"
    assert list(iter_documents(CorpusSource(str(tmp_path / "one.txt"), split=split))) == [
        "a single document"
    ]
    if split == "train":
        with pytest.raises(ValueError, match="no held-out document"):
            list(iter_documents(CorpusSource(str(tmp_path / "one.txt"), split="heldout")))


def test_hub_heldout_is_every_tenth_document_of_the_train_split(monkeypatch):
    import sys
    import types

    asked = []

    def load_dataset(name, config, split, streaming):
        asked.append(split)
        return [{"text": f"doc {i}"} for i in range(35)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    held = list(iter_documents(CorpusSource("someone/corpus", split="heldout")))
    train = list(iter_documents(CorpusSource("someone/corpus", split="train")))
    assert held == ["doc 9", "doc 19", "doc 29"] and len(train) == 32 and not set(held) & set(train)
    assert asked == ["train", "train"]


def test_files_that_are_not_text_are_refused_naming_the_file_and_line(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="blob.txt: not a text file"):
        list(iter_documents(CorpusSource(str(tmp_path / "blob.txt"))))
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8 text \\(byte 3\\)"):
        list(iter_documents(CorpusSource(str(tmp_path / "latin.txt"))))
    (tmp_path / "rows.jsonl").write_text(
        '{"text": "fine"}\n\n{"text": "also fine"}\n{"text": 12}\n'
    )
    with pytest.raises(ValueError, match="rows.jsonl:4: field 'text' is int, not text"):
        list(iter_documents(CorpusSource(str(tmp_path / "rows.jsonl"))))
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": "torn\n')
    with pytest.raises(ValueError, match="rows.jsonl:2: not a JSON line"):
        list(iter_documents(CorpusSource(str(tmp_path / "rows.jsonl"))))
