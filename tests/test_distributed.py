"""torchrun with two processes (CPU, gloo) writes the same files as one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from commvq import io
from commvq.data.kvstore import KVStore


def _cli(args, nproc, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "commvq.cli", "-q", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "commvq.cli",
            "-q",
            *args,
        ]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_collect_and_train_the_same_files_as_one(tiny_llama, corpus_dir, tmp_path):
    collect = [
        "collect",
        "--model",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--num_samples",
        "330",
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
        "--with_queries",
        "--num_queries",
        "40",
    ]
    train = [
        "train-keys",
        "--key_dir",
        "data/key",
        "--code_bits",
        "6",
        "--residuals",
        "2",
        "--max_iters",
        "3",
        "--device",
        "cpu",
        "--output_dir",
        "cb",
    ]
    for name, nproc in (("one", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        _cli([*collect, "--output_dir", "data/key"], nproc, tmp_path / name)
        _cli(train, nproc, tmp_path / name)
    for kind in ("key", "value", "query"):
        a, b = KVStore(tmp_path / "one" / "data" / kind), KVStore(tmp_path / "two" / "data" / kind)
        assert [s.tokens for s in a.shards] == [s.tokens for s in b.shards]
        assert a.num_tokens == (330 if kind != "query" else b.num_tokens)
        for layer in range(a.num_layers):
            assert torch.equal(a.layer(layer).read(), b.layer(layer).read())
    assert not list((tmp_path / "two" / "data" / "key").glob(".progress*"))
    for layer in range(2):
        for head in range(2):
            ta, _ = io.load_head(io.head_file(tmp_path / "one" / "cb", layer, head))
            tb, _ = io.load_head(io.head_file(tmp_path / "two" / "cb", layer, head))
            assert torch.equal(ta, tb)
    conf = io.read_config(tmp_path / "two" / "cb")
    assert set(conf["layers"]) == {"0", "1"}


@pytest.mark.slow
def test_two_processes_train_the_value_codec(tiny_llama, corpus_dir, tmp_path):
    collect = [
        "collect",
        "--model",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--num_samples",
        "128",
        "--max_seq_length",
        "32",
        "--device",
        "cpu",
        "--output_dir",
        "data/key",
    ]
    _cli(collect, 1, tmp_path)
    _cli(["scale", "--key_dir", "data/key"], 1, tmp_path)
    train = [
        "train-values",
        "--model",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--max_seq_length",
        "32",
        "--steps",
        "4",
        "--warmup_steps",
        "1",
        "--save_every",
        "2",
        "--device",
        "cpu",
        "--quant_bits",
        "1",
    ]
    _cli(train, 2, tmp_path)
    conf = json.loads((tmp_path / "value_codec_1bit" / "config.json").read_text())
    assert conf["steps_done"] == 4 and len(conf["loss_history"]) == 4
