import dataclasses
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
        assert f"(default:{shown})" in dense, f"{stage} --{f.name}"


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


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "commvq", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("commvq ")


def test_collect_from_cli_with_yaml(tiny_llama, corpus_dir, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {tiny_llama}\ndataset: {corpus_dir}\nnum_samples: 48\nmax_seq_length: 16\n")
    out = tmp_path / "d" / "key"
    assert cli.main(["-q", "collect", "--config", str(y), "--output_dir", str(out), "--device", "cpu"]) == 0
    assert cli.main(["-q", "scale", "--key_dir", str(out)]) == 0
    from commvq.data.kvstore import KVStore

    assert KVStore(out).num_tokens == 48 and (tmp_path / "d" / "learnable_scale.pt").is_file()
