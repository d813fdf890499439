import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from commvq.config import add_arguments, from_namespace, option, to_dict


@dataclass(frozen=True)
class Demo:
    alpha: int = option(3, "alpha things", aliases=("--alpha_count",))
    name: str = option("x", "a name", choices=("x", "y", "z"))
    path: Path = option(Path("out"), "a path")
    where: Path | None = option(None, "an optional path")
    flag: bool = option(False, "a switch")
    maybe: float | None = option(None, "optional number")


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p, Demo)
    return from_namespace(Demo, p.parse_args(argv)), p


def test_defaults_then_yaml_then_flags(tmp_path):
    cfg, _ = _parse([])
    assert cfg == Demo()
    y = tmp_path / "c.yaml"
    y.write_text("alpha: 7\nname: y\nmaybe: 0.5\n")
    cfg, _ = _parse(["--config", str(y)])
    assert (cfg.alpha, cfg.name, cfg.maybe) == (7, "y", 0.5)
    cfg, _ = _parse(["--config", str(y), "--alpha_count", "9", "--flag"])
    assert (cfg.alpha, cfg.name, cfg.flag) == (9, "y", True)


def test_unknown_yaml_key_and_missing_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("alhpa: 7\n")
    with pytest.raises(ValueError, match="alhpa"):
        _parse(["--config", str(y)])
    with pytest.raises(FileNotFoundError):
        _parse(["--config", str(tmp_path / "none.yaml")])


@pytest.mark.parametrize(
    "text,match",
    [
        ('flag: "false"', "flag: 'false' is not a boolean; write true or false"),
        ("flag: 1", "flag: 1 is not a boolean"),
        ("alpha: 2.5", "alpha: 2.5 is not a whole number"),
        ('alpha: "abc"', "alpha: 'abc' is not a whole number"),
        ("alpha: true", "alpha: True is not a whole number"),
        ("maybe: [1]", "maybe: \\[1\\] is not a number"),
        ("name: w", "name: 'w' is not one of"),
        ("alpha: null", "alpha: null is not allowed"),
    ],
)
def test_yaml_values_are_checked_against_their_types_before_anything_runs(tmp_path, text, match):
    y = tmp_path / "c.yaml"
    y.write_text(text + "\n")
    with pytest.raises(ValueError, match=f"--config {y}: {match}"):
        _parse(["--config", str(y)])


def test_yaml_values_of_the_right_type_are_taken(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("alpha: 4\nmaybe: 2\nflag: false\npath: some/where\nname: z\n")
    cfg, _ = _parse(["--config", str(y)])
    assert cfg == Demo(alpha=4, name="z", path=Path("some/where"), flag=False, maybe=2.0)
    assert isinstance(cfg.maybe, float)


def test_a_string_false_never_overwrites_a_store(tiny_llama, corpus_dir, tmp_path):
    from commvq.cli import main
    from commvq.data.kvstore import KVStore

    args = [
        "collect",
        "--model",
        str(tiny_llama),
        "--dataset",
        str(corpus_dir),
        "--output_dir",
        str(tmp_path / "data" / "key"),
        "--num_samples",
        "40",
        "--max_seq_length",
        "16",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    before = KVStore(tmp_path / "data" / "key").layer(0).read()
    y = tmp_path / "c.yaml"
    y.write_text('overwrite: "false"\nmax_seq_length: 8\n')
    assert main([*args[:-6], "--num_samples", "40", "--device", "cpu", "--config", str(y)]) == 2
    assert (KVStore(tmp_path / "data" / "key").layer(0).read() == before).all()


def test_help_shows_every_option_with_its_default():
    _, p = _parse([])
    text = p.format_help()
    for name, default in [
        ("alpha", 3),
        ("name", "x"),
        ("path", "out"),
        ("flag", False),
        ("maybe", None),
    ]:
        assert f"--{name}" in text
        assert f"(default: {default})" in text


def test_to_dict_is_json_ready():
    want = {"alpha": 3, "name": "x", "path": "out", "flag": False, "maybe": None, "where": None}
    assert to_dict(Demo()) == want


def test_path_flags_give_paths_as_their_defaults_do():
    """A flag of a path field is a Path, as its default is (code joins it with ``/``)."""
    cfg, _ = _parse(["--path", "a/b", "--where", "c"])
    assert cfg.path / "x" == Path("a/b/x") and cfg.where == Path("c")
    assert _parse([])[0].where is None
