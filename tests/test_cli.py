import dataclasses
import os
import re
import subprocess
import sys

import pytest

from commvq import cli


@pytest.mark.parametrize("stage", [s.name for s in cli.stages()])
def test_every_subcommand_help_lists_every_option_with_default(stage, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--help"])
    assert e.value.code == 0
    raw = capsys.readouterr().out
    text = " ".join(raw.split())
    dense = "".join(raw.split())  # argparse may wrap long defaults anywhere
    cfg = next(s.config for s in cli.stages() if s.name == stage)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("positional"):
            assert f.name.upper() in text
            continue
        assert f"--{f.name}" in text
        shown = "".join(str(f.default).split())
        said = "(default" in f.metadata.get(
            "help", ""
        )  # the help states the effective default itself
        assert said or f"(default:{shown})" in dense, f"{stage} --{f.name}"
    assert not re.search(r"\(default:[^()]*\)\s*\(default", text), (
        f"{stage}: an option shows two defaults"
    )


def test_top_level_help_lists_stages(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for s in cli.stages():
        assert s.name in out


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys):
    assert cli.main(["collect", "--num_samples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num_samples 0" in err[0]
    assert cli.main(["scale", "--key_dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "commvq collect" in err[0]
    assert cli.main(["collect", "--model", str(tmp_path / "m.gguf"), "--dataset", "embedded"]) == 2
    assert re.search(r"no such file", capsys.readouterr().err)


def test_quiet_silences_progress_bars_and_depths_are_fractions(tmp_path, capsys):
    _small_store(tmp_path)
    env = {**os.environ, "TQDM_MININTERVAL": "0"}  # every bar update printed where bars are on
    for quiet, bars in ((False, True), (True, False)):
        args = [
            sys.executable,
            "-m",
            "commvq",
            *(["-q"] if quiet else []),
            "scale",
            "--key_dir",
            str(tmp_path / "data" / "key"),
        ]
        out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        # stderr is a pipe here, not a terminal: plain progress lines (no bar redraws) or none
        assert ("scale: done, 6 layer in" in out.stderr) == bars, out.stderr
        assert "\r" not in out.stderr
    assert cli.main(["eval", "ppl", "--depths", "0,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--depths 0,2: give fractions of the context between 0 and 1" in err[0]
    assert cli.main(["eval", "ppl", "--ppl_tokens", "512", "--ppl_prefill", "511"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ppl_prefill 511: from 0 to --ppl_tokens - 2 (510)" in err[0]
    # every token of a document inside the window: nothing scored (was a ZeroDivisionError)
    assert cli.main(["eval", "compare", "--ppl_tokens", "128", "--window", "128"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ppl_tokens 128: scoring starts after the first --window" in err[0]
    assert (
        cli.main(["eval", "passkey", "--ppl_tokens", "128", "--window", "128", "--lengths", "0"])
        == 2
    )
    assert "--lengths 0" in capsys.readouterr().err  # the ppl check leaves other suites alone


def _small_store(root):
    import torch

    from commvq.data.kvstore import KVStoreWriter
    from tests.pipeline.conftest import SPEC

    for kind in ("key", "value"):
        w = KVStoreWriter(
            root / "data" / kind, kind, 3, 16, torch.float32, settings={"spec": SPEC.to_dict()}
        )
        w.write_shard([{"x": torch.randn(20, 16)} for _ in range(3)])
        w.finish(False)
    return root / "data" / "key"


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    import errno

    import torch

    key_dir = _small_store(tmp_path)

    def full(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    assert cli.main(["-q", "scale", "--key_dir", str(key_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "free some space" in err[0]
    assert not list((tmp_path / "data").glob("learnable_scale*")) and not list(
        (tmp_path / "data").glob(".*tmp")
    )
    out = (
        tmp_path / "codebook_6bits_8group_1residuals"
    )  # train-keys: the codebook files hit the full disk
    assert (
        cli.main(
            [
                "-q",
                "train-keys",
                "--key_dir",
                str(key_dir),
                "--output_dir",
                str(out),
                "--code_bits",
                "6",
                "--max_iters",
                "1",
                "--num_samples",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert (
        not list(out.rglob("*.pt"))
        and not list(out.rglob(".*tmp"))
        and not list(out.glob("metrics/*.json"))
    )


def test_bugs_keep_their_traceback_and_debug_shows_every_one(tmp_path, capsys, monkeypatch):
    from commvq.pipeline import scale

    def buggy(cfg):
        return int("not a number")  # a ValueError raised outside commvq's own code: a bug

    monkeypatch.setattr(scale, "run", buggy)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["scale", "--key_dir", str(tmp_path)])
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):  # a user mistake, with its traceback on request
        cli.main(["--debug", "scale", "--key_dir", str(tmp_path / "none")])
    assert cli.main(["scale", "--key_dir", str(tmp_path / "none")]) == 2


def test_bad_devices_damaged_manifests_and_poisoned_scales_are_one_line(tmp_path, capsys):
    import json
    import pickle

    import torch

    def one_line(args, *words):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err

    key_dir = _small_store(tmp_path)
    one_line(
        ["train-keys", "--key_dir", str(key_dir), "--device", "gpu"], "--device gpu: not a device"
    )
    if not torch.cuda.is_available():
        one_line(
            ["train-keys", "--key_dir", str(key_dir), "--device", "cuda"],
            "--device cuda",
            "no CUDA GPU",
        )
    man = json.loads((key_dir / "manifest.json").read_text())
    del man["kind"]
    (key_dir / "manifest.json").write_text(json.dumps(man))
    one_line(["train-keys", "--key_dir", str(key_dir)], "damaged manifest", "--overwrite")
    from commvq.pipeline.scale import load_scales

    scales = tmp_path / "scales.pt"
    for poison in (b"not a pickle", pickle.dumps({"key": {0: "os.system"}, "value": {}})):
        scales.write_bytes(poison)
        with pytest.raises(ValueError, match="commvq scale"):
            load_scales(scales)
    torch.save({"key": {0: torch.tensor([float("nan")])}, "value": {0: torch.ones(1)}}, scales)
    with pytest.raises(ValueError, match="finite tensor"):
        load_scales(scales)


def test_console_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "commvq", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("commvq ")


def test_collect_from_cli_with_yaml(tiny_llama, corpus_dir, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        f"model: {tiny_llama}\ndataset: {corpus_dir}\nnum_samples: 48\nmax_seq_length: 16\n"
    )
    out = tmp_path / "d" / "key"
    assert (
        cli.main(["-q", "collect", "--config", str(y), "--output_dir", str(out), "--device", "cpu"])
        == 0
    )
    assert cli.main(["-q", "scale", "--key_dir", str(out)]) == 0
    from commvq.data.kvstore import KVStore

    assert KVStore(out).num_tokens == 48 and (tmp_path / "d" / "learnable_scale.pt").is_file()
