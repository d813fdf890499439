import itertools

import pytest
import torch

from commvq.data import kvstore
from commvq.data.corpus import CorpusSource, iter_documents, pack
from commvq.data.kvstore import KVStore
from commvq.fsutil import write_json
from commvq.integrations.hf.loader import load_model
from commvq.pipeline import collect
from commvq.pipeline.collect import CollectConfig
from tests.helpers import check_collected_against_model


def _cfg(model_dir, corpus_dir, out, **kw):
    args = dict(
        model=str(model_dir),
        dataset=str(corpus_dir),
        output_dir=out / "data" / "key",
        num_samples=200,
        max_seq_length=32,
        batch_size=2,
        shard_tokens=64,
        dtype="float32",
        device="cpu",
    )
    args.update(kw)
    return CollectConfig(**args)


def _sequences(lm, corpus_dir, seq_len, n):
    tok = lm.tokenizer
    docs = (
        tok(d, add_special_tokens=False)["input_ids"]
        for d in iter_documents(CorpusSource(str(corpus_dir)))
    )
    return list(itertools.islice(pack(docs, seq_len, tok.eos_token_id), n))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_keys_and_values_are_exact_projections_and_rope_gives_cache_keys(
    tiny_models, corpus_dir, tmp_path, arch
):
    cfg = _cfg(tiny_models[arch], corpus_dir, tmp_path)
    lm = load_model(cfg.model, device="cpu")
    collect.run(cfg, loaded=lm)
    keys, values = KVStore(cfg.output_dir), KVStore(tmp_path / "data" / "value")
    assert keys.num_tokens == values.num_tokens == 200
    assert keys.width == lm.spec.kv_dim

    batch = torch.tensor(_sequences(lm, corpus_dir, 32, 2))  # the first batch of the run
    check_collected_against_model(lm, cfg.output_dir, tmp_path / "data" / "value", batch)


def test_interrupted_run_resumes_to_the_same_data(tiny_llama, corpus_dir, tmp_path, monkeypatch):
    lm = load_model(str(tiny_llama), device="cpu")
    whole = _cfg(tiny_llama, corpus_dir, tmp_path / "whole", with_queries=True, num_queries=50)
    collect.run(whole, loaded=lm)

    cut = _cfg(tiny_llama, corpus_dir, tmp_path / "cut", with_queries=True, num_queries=50)
    real_write = kvstore.KVStoreWriter.write_shard
    calls = {"n": 0}

    def dying_write(self, per_layer):
        calls["n"] += 1
        if calls["n"] == 5:  # shard 1 of the key store done, values of shard 1 not yet
            raise KeyboardInterrupt
        real_write(self, per_layer)

    monkeypatch.setattr(kvstore.KVStoreWriter, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        collect.run(cut, loaded=lm)
    monkeypatch.setattr(kvstore.KVStoreWriter, "write_shard", real_write)
    assert (
        KVStore(cut.output_dir).num_tokens > KVStore(tmp_path / "cut" / "data" / "value").num_tokens
    )
    collect.run(cut, loaded=lm)

    for kind in ("key", "value", "query"):
        a, b = (
            KVStore(tmp_path / "whole" / "data" / kind),
            KVStore(tmp_path / "cut" / "data" / kind),
        )
        assert a.num_tokens == b.num_tokens
        for layer in range(a.num_layers):
            assert torch.equal(a.layer(layer).read(), b.layer(layer).read())
    q = KVStore(tmp_path / "whole" / "data" / "query")
    assert q.width == lm.spec.q_dim and 45 <= q.num_tokens <= 50
    pos = q.layer(0).read(name="pos")
    assert torch.equal(pos, (torch.arange(200)[:: collect.query_stride(200, 50)] % 32).int())


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_a_damaged_shard_is_collected_again_on_resume(
    tiny_llama, corpus_dir, tmp_path, damage, caplog
):
    """The reader's message says: re-run collect. Collect then finds the damaged shard, drops it and
    every shard after it from the manifests, and collects them again: the same data as before."""
    import logging

    caplog.set_level(logging.WARNING, logger="commvq")
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, with_queries=True, num_queries=50)
    collect.run(cfg, loaded=lm)
    before = {kind: KVStore(tmp_path / "data" / kind).layer(1).read() for kind in ("key", "value")}
    shard = tmp_path / "data" / "value" / "L001" / "00001.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-40])
    elif damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(b"not a shard")
    with pytest.raises((ValueError, FileNotFoundError), match="re-run `commvq collect`"):
        KVStore(tmp_path / "data" / "value").layer(1).read()
    collect.run(cfg, loaded=lm)
    assert "shard 1 of the stores" in caplog.text and "collecting again from there" in caplog.text
    for kind in ("key", "value"):
        store = KVStore(tmp_path / "data" / kind)
        assert store.num_tokens == 200 and torch.equal(store.layer(1).read(), before[kind])


def test_rerun_is_a_no_op_and_more_samples_extend(tiny_llama, corpus_dir, tmp_path):
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, num_samples=100)
    collect.run(cfg, loaded=lm)
    first = KVStore(cfg.output_dir).layer(0).read()
    collect.run(cfg, loaded=lm)
    assert KVStore(cfg.output_dir).num_tokens == 100
    collect.run(_cfg(tiny_llama, corpus_dir, tmp_path, num_samples=150), loaded=lm)
    store = KVStore(cfg.output_dir)
    assert store.num_tokens == 150 and torch.equal(store.layer(0).read(0, 100), first)
    direct = _cfg(tiny_llama, corpus_dir, tmp_path / "direct", num_samples=150)
    collect.run(direct, loaded=lm)
    assert torch.equal(KVStore(direct.output_dir).layer(1).read(), store.layer(1).read())


def test_a_second_writer_fails_at_once_naming_the_first(tiny_llama, corpus_dir, tmp_path):
    """Two runs into one data folder: the second fails before touching it, and the first's shards,
    temporary files and manifest are its own (the lock dies with its holder)."""
    import os
    import subprocess
    import sys

    from commvq.fsutil import LockedError, exclusive_lock

    lm = load_model(str(tiny_llama), device="cpu")
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, num_samples=64)
    lock = tmp_path / "data" / collect.LOCK_NAME
    with exclusive_lock(lock, "test"):  # the first writer, still running
        (tmp_path / "data" / "key").mkdir(parents=True)
        stale = tmp_path / "data" / "key" / ".first.safetensors.123.tmp"
        stale.write_text("the first writer's file in progress")
        with pytest.raises(
            LockedError, match=f"is being written by pid {os.getpid()} on .* since .*; wait"
        ):
            collect.run(_cfg(tiny_llama, corpus_dir, tmp_path, num_samples=64, seed=1), loaded=lm)
        assert stale.exists() and not (tmp_path / "data" / "key" / "manifest.json").exists()
        # the same from another process, through the command line: one line, exit 2
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "commvq",
                "collect",
                "--model",
                str(tiny_llama),
                "--dataset",
                str(corpus_dir),
                "--output_dir",
                str(cfg.output_dir),
                "--num_samples",
                "64",
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (
            out.returncode == 2
            and "error:" in out.stderr
            and "is being written by pid" in out.stderr
        )
        assert "Traceback" not in out.stderr
        stale.unlink()  # the first writer ends
    collect.run(cfg, loaded=lm)  # the lock went with its holder
    assert KVStore(cfg.output_dir).num_tokens == 64


def test_changed_settings_need_overwrite(tiny_llama, corpus_dir, tmp_path):
    lm = load_model(str(tiny_llama), device="cpu")
    collect.run(_cfg(tiny_llama, corpus_dir, tmp_path, num_samples=40), loaded=lm)
    with pytest.raises(ValueError, match="max_seq_length"):
        collect.run(
            _cfg(tiny_llama, corpus_dir, tmp_path, num_samples=80, max_seq_length=16), loaded=lm
        )
    collect.run(
        _cfg(tiny_llama, corpus_dir, tmp_path, num_samples=80, max_seq_length=16, overwrite=True),
        loaded=lm,
    )
    assert KVStore(tmp_path / "data" / "key").settings["max_seq_length"] == 16


def test_corpus_smaller_than_asked_stops_with_what_it_has(tiny_llama, corpus_dir, tmp_path, caplog):
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, num_samples=10**6)
    collect.run(cfg, loaded=lm)
    store = KVStore(cfg.output_dir)
    assert 0 < store.num_tokens < 10**6 and store.manifest["exhausted"]
    assert "ran out" in caplog.text


def test_bad_inputs(tiny_llama, corpus_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="num_samples 0"):
        _cfg(tiny_llama, corpus_dir, tmp_path, num_samples=0)
    lm = load_model(str(tiny_llama), device="cpu")
    with pytest.raises(ValueError, match="exceeds the model's limit of 256"):
        collect.run(_cfg(tiny_llama, corpus_dir, tmp_path, max_seq_length=257), loaded=lm)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(ValueError, match="no text"):
        collect.run(_cfg(tiny_llama, empty, tmp_path / "e"), loaded=lm)
    assert not (tmp_path / "e" / "data" / "key" / "manifest.json").exists()

    class Tiny:
        free = 10

    monkeypatch.setattr(collect.shutil, "disk_usage", lambda p: Tiny)
    with pytest.raises(OSError, match="only 0.00 GiB is free"):
        collect.run(_cfg(tiny_llama, corpus_dir, tmp_path / "full"), loaded=lm)
    assert not (tmp_path / "full" / "data" / "key" / "L000").exists()


def test_bytes_needed_counts_keys_values_and_queries(tiny_llama, corpus_dir, tmp_path):
    lm = load_model(str(tiny_llama), device="cpu")
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, dtype="bfloat16")
    assert collect.bytes_needed(cfg, lm, 100) == 100 * 2 * 2 * 32 * 2
    qcfg = _cfg(
        tiny_llama, corpus_dir, tmp_path, dtype="bfloat16", with_queries=True, num_queries=50
    )
    assert collect.bytes_needed(qcfg, lm, 100) == 100 * 2 * 2 * 32 * 2 + 25 * 2 * 64 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_collect_on_gpu_stores_exact_projections(tiny_llama, corpus_dir, tmp_path):
    cfg = _cfg(
        tiny_llama,
        corpus_dir,
        tmp_path,
        device="cuda",
        model_dtype="float32",
        with_queries=True,
        num_queries=60,
    )
    lm = load_model(cfg.model, model_dtype="float32", device="cuda")
    collect.run(cfg, loaded=lm)
    cpu = load_model(cfg.model, device="cpu")
    batch = torch.tensor(_sequences(cpu, corpus_dir, 32, 2))
    base = lm.model.base_model
    with torch.inference_mode():
        out = base(input_ids=batch.cuda(), output_hidden_states=True)
    keys = KVStore(cfg.output_dir)
    for i, layer in enumerate(base.layers):
        ref = layer.self_attn.k_proj(layer.input_layernorm(out.hidden_states[i])).reshape(
            -1, lm.spec.kv_dim
        )
        assert torch.allclose(keys.layer(i).read(0, 64), ref.cpu(), atol=1e-5)
    assert KVStore(tmp_path / "data" / "query").num_tokens == 50


def _same_store(a, b):
    assert a.num_tokens == b.num_tokens
    for layer in range(a.num_layers):
        for name in ("x", "pos"):
            assert torch.equal(a.layer(layer).read(name=name), b.layer(layer).read(name=name))


@pytest.mark.parametrize("recorded", [True, False])
def test_an_extended_query_store_holds_what_a_fresh_run_collects(
    tiny_llama, corpus_dir, tmp_path, recorded
):
    """100 tokens at 50 queries keep every 2nd token's query; 200 tokens keep every 4th: the
    extension thins the first 100 tokens' queries to every 4th, as the fresh run keeps them.
    ``recorded=False``: a store of an older version, whose manifest lacks the stride."""
    lm = load_model(str(tiny_llama), device="cpu")
    fresh = _cfg(
        tiny_llama,
        corpus_dir,
        tmp_path / "fresh",
        num_samples=200,
        with_queries=True,
        num_queries=50,
    )
    collect.run(fresh, loaded=lm)
    grown = _cfg(
        tiny_llama,
        corpus_dir,
        tmp_path / "grown",
        num_samples=100,
        with_queries=True,
        num_queries=50,
    )
    collect.run(grown, loaded=lm)
    assert KVStore(tmp_path / "grown" / "data" / "query").num_tokens == 50
    if not recorded:
        root = tmp_path / "grown" / "data" / "query"
        man = kvstore.read_manifest(root)
        del man["settings"]["query_stride"]
        write_json(root / kvstore.MANIFEST, man)
    collect.run(
        _cfg(
            tiny_llama,
            corpus_dir,
            tmp_path / "grown",
            num_samples=200,
            with_queries=True,
            num_queries=50,
        ),
        loaded=lm,
    )
    a, b = (
        KVStore(tmp_path / "fresh" / "data" / "query"),
        KVStore(tmp_path / "grown" / "data" / "query"),
    )
    _same_store(a, b)
    assert kvstore.read_manifest(b.root)["settings"]["query_stride"] == 4
    assert not any(p.name.startswith(".query") for p in (tmp_path / "grown" / "data").iterdir())


def test_a_query_stride_that_is_not_a_subsample_is_refused_in_one_line(
    tiny_llama, corpus_dir, tmp_path
):
    lm = load_model(str(tiny_llama), device="cpu")
    collect.run(
        _cfg(tiny_llama, corpus_dir, tmp_path, num_samples=100, with_queries=True, num_queries=50),
        loaded=lm,
    )
    before = KVStore(tmp_path / "data" / "query").layer(0).read()
    with pytest.raises(ValueError, match=r"one token in 2; .* keep one in 3, .*--num_queries 75 "):
        collect.run(
            _cfg(
                tiny_llama, corpus_dir, tmp_path, num_samples=150, with_queries=True, num_queries=50
            ),
            loaded=lm,
        )
    assert torch.equal(KVStore(tmp_path / "data" / "query").layer(0).read(), before)  # untouched


@pytest.mark.parametrize("when", ["writing", "between_renames"])
def test_a_kill_while_thinning_leaves_the_old_or_the_new_store(
    tiny_llama, corpus_dir, tmp_path, monkeypatch, when
):
    lm = load_model(str(tiny_llama), device="cpu")
    fresh = _cfg(
        tiny_llama,
        corpus_dir,
        tmp_path / "fresh",
        num_samples=200,
        with_queries=True,
        num_queries=50,
    )
    collect.run(fresh, loaded=lm)
    small = _cfg(
        tiny_llama,
        corpus_dir,
        tmp_path / "grown",
        num_samples=100,
        with_queries=True,
        num_queries=50,
    )
    collect.run(small, loaded=lm)
    big = _cfg(
        tiny_llama,
        corpus_dir,
        tmp_path / "grown",
        num_samples=200,
        with_queries=True,
        num_queries=50,
    )
    real_replace, real_write = kvstore.os.replace, kvstore.KVStoreWriter.write_shard
    if when == "writing":

        def dying(self, per_layer):
            raise KeyboardInterrupt

        monkeypatch.setattr(kvstore.KVStoreWriter, "write_shard", dying)
    else:

        def dying(src, dst):
            if str(src).endswith(
                ".query.thin"
            ):  # the old store moved aside, the new one not yet in place
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(kvstore.os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        collect.run(big, loaded=lm)
    data = tmp_path / "grown" / "data"
    if when == "between_renames":
        assert not (data / "query").exists() and (data / ".query.old").is_dir()
    else:
        assert KVStore(data / "query").num_tokens == 50  # the old store, untouched
    monkeypatch.setattr(kvstore.os, "replace", real_replace)
    monkeypatch.setattr(kvstore.KVStoreWriter, "write_shard", real_write)
    collect.run(big, loaded=lm)
    _same_store(
        KVStore(tmp_path / "fresh" / "data" / "query"),
        KVStore(tmp_path / "grown" / "data" / "query"),
    )
    assert not any(p.name.startswith(".query") for p in (tmp_path / "grown" / "data").iterdir())


def test_a_full_disk_during_collect_is_one_line_and_a_rerun_completes_the_same_data(
    tiny_llama, corpus_dir, tmp_path, capsys, monkeypatch
):
    """The third shard file hits a full disk: one line and exit 2, no temporary file left, the
    manifests list only whole shards; once space is back the same command finishes the data."""
    import errno

    from commvq import cli

    args = [
        "-q",
        "collect",
        "--model",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--num_samples",
        "200",
        "--max_seq_length",
        "32",
        "--batch_size",
        "2",
        "--shard_tokens",
        "64",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    real_save, calls = kvstore.save_file, {"n": 0}

    def full(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(kvstore, "save_file", full)
    out = tmp_path / "cut" / "data" / "key"
    assert cli.main(args + ["--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    data = tmp_path / "cut" / "data"
    assert not list(data.rglob(".*tmp"))
    for kind in ("key", "value"):  # whatever a manifest lists is whole
        man = kvstore.read_manifest(data / kind)
        for i, shard in enumerate(man["shards"] if man else []):
            for layer in range(man["num_layers"]):
                assert kvstore.shard_ok(
                    kvstore.shard_file(data / kind, layer, i), shard["tokens"], man["width"]
                )
    monkeypatch.setattr(kvstore, "save_file", real_save)
    assert cli.main(args + ["--output_dir", str(out)]) == 0
    whole = tmp_path / "whole" / "data" / "key"
    assert cli.main(args + ["--output_dir", str(whole)]) == 0
    for kind in ("key", "value"):
        _same_keys(KVStore(tmp_path / "whole" / "data" / kind), KVStore(data / kind))


def _same_keys(a, b):
    assert a.num_tokens == b.num_tokens
    for layer in range(a.num_layers):
        assert torch.equal(a.layer(layer).read(), b.layer(layer).read())
