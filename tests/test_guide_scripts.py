"""The guide's shell scripts, every option, on a tiny model (run from a 'training' folder)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parents[1] / "training"


def _bash(script, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(TRAINING / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_train_e2e_key_codebook_sh_every_option_and_resume(tiny_llama, corpus_dir, tmp_path):
    args = [
        "--model",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--output_dir",
        "my_codebook",
        "--quant_bits",
        "1",
        "--solver",
        "adam",
        "--epochs",
        "2",
        "--lr",
        "0.002",
        "--batch_size",
        "16",
        "--num_samples",
        "300",
        "--layer",
        "1",
        "--max_seq_length",
        "32",
        "--gpus",
        "1",
    ]
    out = _bash("train_e2e_key_codebook.sh", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Epoch 2/2 - Loss:" in out.stdout and "E2E codebooks:" in out.stdout
    assert f"{tmp_path}/my_codebook" in out.stdout
    assert (tmp_path / "data" / "learnable_scale.pt").is_file()
    assert (tmp_path / "data" / "query" / "manifest.json").is_file()
    conf = json.loads((tmp_path / "my_codebook" / "config.json").read_text())
    assert conf["method"] == "e2e" and conf["residuals"] == 1 and set(conf["layers"]) == {"1"}
    assert conf["train_config"]["lr"] == 0.002 and conf["train_config"]["batch_size"] == 16
    # run again: collection and the finished layer are skipped
    again = _bash("train_e2e_key_codebook.sh", *args, cwd=tmp_path)
    assert again.returncode == 0 and "Epoch" not in again.stdout
    assert "nothing to do" in again.stderr
    # the default solver: least-squares rounds with a beam, recorded for the cache
    lstsq = [
        "--model",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--output_dir",
        "my_lstsq",
        "--quant_bits",
        "1",
        "--rounds",
        "1",
        "--beam",
        "2",
        "--num_samples",
        "300",
        "--layer",
        "1",
        "--max_seq_length",
        "32",
        "--gpus",
        "1",
    ]
    out = _bash("train_e2e_key_codebook.sh", *lstsq, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Round 1/1 - Recon:" in out.stdout
    conf = json.loads((tmp_path / "my_lstsq" / "config.json").read_text())
    assert conf["beam"] == 2 and conf["layers"]["1"]["solver"] == "lstsq"
    start, stop = conf["layers"]["1"]["rows"]["eval"]
    assert start == 300 < stop  # the script collects held-out rows beyond the samples


def test_guide_scripts_help_and_bad_options(tmp_path):
    out = _bash("train_e2e_key_codebook.sh", "--help", cwd=tmp_path)
    assert out.returncode == 0
    for opt in (
        "--model",
        "--dataset",
        "--output_dir",
        "--quant_bits",
        "--solver",
        "--rounds",
        "--beam",
        "--epochs",
        "--lr",
        "--batch_size",
        "--num_samples",
        "--layer",
        "--help",
    ):
        assert opt in out.stdout
    bad = _bash("train_e2e_key_codebook.sh", "--epoch", "3", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown option --epoch" in bad.stderr
    assert _bash("train_e2e_key_codebook.sh", "--lr", cwd=tmp_path).returncode == 2
    out = _bash("quantize_key_cache_e2e.sh", "--help", cwd=tmp_path)
    assert out.returncode == 0 and "--epochs" in out.stdout


@pytest.mark.slow
def test_quantize_key_cache_scripts_from_existing_data(tiny_llama, corpus_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            "python",
            str(TRAINING / "collect_kv_for_e2e.py"),
            "--model_path",
            str(tiny_llama),
            "--dataset",
            str(corpus_dir),
            "--num_samples",
            "200",
            "--max_seq_length",
            "32",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    out = _bash(
        "quantize_key_cache_e2e.sh",
        "--epochs",
        "1",
        "--lr",
        "0.001",
        "--code_bits",
        "6",
        "--residuals",
        "1",
        "--batch_size",
        "32",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(
        p.name for p in (tmp_path / "codebook_e2e_6bits_16group_1residuals").glob("*.pt")
    ) == ["000_0.pt", "000_1.pt", "001_0.pt", "001_1.pt"]
    one = subprocess.run(
        [
            "python",
            str(TRAINING / "quantize_key_cache.py"),
            "0",
            "--training_method",
            "em",
            "--code_bits",
            "6",
            "--residuals",
            "1",
            "--max_iters",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert sorted(
        p.name for p in (tmp_path / "codebook_6bits_16group_1residuals").glob("*.pt")
    ) == ["000_0.pt", "000_1.pt"]
