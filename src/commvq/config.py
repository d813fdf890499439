"""Frozen config dataclasses <-> command-line flags and YAML: defaults < YAML < flags.

A stage declares its options once, as dataclass fields made with :func:`option`; the CLI and
the guide's scripts build their flags from those fields, so ``--help`` always lists every option
with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    aliases: tuple = (),
    positional: bool = False,
):
    """A config field with its help text, optional choices and extra flag spellings.

    ``positional=True`` makes it a positional argument (a list field takes one or more values).
    """
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "positional": positional}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; ``Path`` -> ``str`` for parsing."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    return str if tp is Path else tp


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass ``cls`` (defaults are shown, not set)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        meta = f.metadata
        tp = _base_type(hints[f.name])
        if meta.get("positional"):
            many = typing.get_origin(tp) is list
            parser.add_argument(
                f.name,
                nargs="+" if many else None,
                metavar=f.name.upper(),
                type=typing.get_args(tp)[0] if many else tp,
                help=meta.get("help", ""),
            )
            continue
        names = [f"--{f.name}", *meta.get("aliases", ())]
        text = meta.get("help", "")
        help_text = (
            text if "(default" in text else f"{text} (default: {f.default})"
        )  # a help may say it better
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        parser.add_argument(*names, **kwargs)
    parser.add_argument(
        "--config",
        dest="_yaml",
        default=None,
        metavar="YAML",
        help="YAML file of options; flags given on the command line win (default: None)",
    )


def load_yaml(path: str | None, cls: type) -> dict[str, Any]:
    """Options from a YAML mapping; unknown keys are an error naming them."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; give the path of a YAML file")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {unknown}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {
        k: coerce(v, hints[k], f"--config {path}: {k}", fields[k].metadata.get("choices"))
        for k, v in data.items()
    }


def coerce(value: Any, tp: Any, where: str, choices: tuple | None = None) -> Any:
    """``value`` as the field type ``tp`` wants it, or a ``ValueError`` naming ``where``: booleans
    only from YAML booleans, integers only from whole numbers, no silent truthiness."""
    optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: null is not allowed here; give a value or leave the option out")
    base = _base_type(tp)
    is_path = Path in (typing.get_args(tp) if optional else (tp,))
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: {value!r} is not a list")
        item = typing.get_args(base)[0]
        return [coerce(v, item, where) for v in value]
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {value!r} is not a boolean; write true or false (unquoted)")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {value!r} is not a whole number")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {value!r} is not a number")
        return float(value)
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: {value!r} is not text")
        value = str(value)
        if choices and value not in choices:
            raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")
        return Path(value) if is_path else value
    return value


def _as_path(value: Any, tp: Any) -> Any:
    """A flag's text as a :class:`Path` where the field holds paths (flags are parsed as text)."""
    union = typing.get_origin(tp) in (list, types.UnionType, typing.Union)
    args = typing.get_args(tp) if union else ()
    if Path in (tp, *args):
        if isinstance(value, str):
            return Path(value)
        if isinstance(value, list):
            return [Path(v) if isinstance(v, str) else v for v in value]
    return value


def from_namespace(cls: type[T], ns: argparse.Namespace, **fixed: Any) -> T:
    """Build ``cls`` from dataclass defaults < YAML (``--config``) < given flags < ``fixed``."""
    values = load_yaml(getattr(ns, "_yaml", None), cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: _as_path(v, hints[k]) for k, v in vars(ns).items() if k in names})
    values.update(fixed)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
