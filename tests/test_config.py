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


def test_help_shows_every_option_with_its_default():
    _, p = _parse([])
    text = p.format_help()
    for name, default in [("alpha", 3), ("name", "x"), ("path", "out"), ("flag", False), ("maybe", None)]:
        assert f"--{name}" in text
        assert f"(default: {default})" in text


def test_to_dict_is_json_ready():
    assert to_dict(Demo()) == {"alpha": 3, "name": "x", "path": "out", "flag": False, "maybe": None}
