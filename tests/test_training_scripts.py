"""The guide's entry points work as written, from the training/ folder's point of view."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from commvq.pipeline.scale import load_scales

TRAINING = Path(__file__).resolve().parents[1] / "training"


def _run(script, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(TRAINING / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_guide_collect_then_make_scale(tiny_llama, corpus_dir, tmp_path):
    out = _run(
        "collect_kv_for_e2e.py",
        "--model_path",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--output_dir",
        "data/key",
        "--num_samples",
        "96",
        "--max_seq_length",
        "32",
        "--quant_bits",
        "2",
        "--batch_size",
        "2",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "key" / "manifest.json").is_file()
    assert (tmp_path / "data" / "value" / "manifest.json").is_file()
    out = _run("make_scale.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    scales = load_scales(tmp_path / "data" / "learnable_scale.pt")
    assert scales["key"][0].shape == (32,) and torch.all(scales["value"][1] > 0)


def test_guide_scripts_fail_cleanly(tmp_path):
    out = _run("make_scale.py", cwd=tmp_path)
    assert out.returncode == 2 and "commvq collect" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run("collect_kv_for_e2e.py", "--help", cwd=tmp_path)
    assert out.returncode == 0 and "--model_path" in out.stdout and "--quant_bits" in out.stdout


def test_guide_finetune_script(tiny_llama, corpus_dir, tmp_path):
    out = _run(
        "collect_kv_for_e2e.py",
        "--model_path",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--num_samples",
        "128",
        "--max_seq_length",
        "32",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert _run("make_scale.py", cwd=tmp_path).returncode == 0
    out = _run(
        "finetune.py",
        "--model_path",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--quant_bits",
        "1",
        "--max_seq_length",
        "32",
        "--steps",
        "3",
        "--warmup_steps",
        "1",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "value_codec_1bit" / "value_codec.safetensors").is_file()
    for script in (
        "llama3.1_8b_int2.sh",
        "llama3.1_8b_int1.sh",
        "smollm2_int1.sh",
        "smollm2_int2.sh",
    ):
        text = (TRAINING / "finetune" / script).read_text()
        assert "finetune.py" in text and "--quant_bits" in text
