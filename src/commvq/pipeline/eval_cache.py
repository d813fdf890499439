"""Evaluation results kept per method and part, keyed by everything that decides them, so that a
rerun does only what changed.

A method's results live in ``<output>/cache/<method>.json`` as parts (``bytes``, ``ppl``,
``passkey``, ``needle``), each with the fingerprint it was computed under: the method (name, beam,
the bytes of its codebook and codec files), the model (its name, or its local files' sizes and
times), the device, the cache's window and sink, commvq's version, and the settings of that part
alone (a new ``--lengths`` reruns retrieval, not perplexity).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from commvq import __version__
from commvq.fsutil import write_json

RETRIEVAL = ("lengths", "depths", "samples", "seed")
# what a part's result holds; raised when a part gains a field, so older results are recomputed
PART_FORMAT = {"bytes": 2, "ppl": 1, "passkey": 1, "needle": 1}
PART_SETTINGS = {
    "bytes": (),
    "ppl": ("ppl_tokens", "ppl_docs", "ppl_chunk", "ppl_prefill"),
    "passkey": RETRIEVAL,
    "needle": RETRIEVAL,
}


def folder_digest(folder: Path | None) -> str | None:
    """sha256 over the names and bytes of a folder's files (plots left out), or None."""
    if folder is None:
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix != ".png"):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def model_identity(model: str) -> Any:
    """The model argument, and for a local folder or file its files' names, sizes and times."""
    path = Path(model)
    if not path.exists():
        return model
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [model, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def fingerprint(common: dict, part: str, settings: dict) -> str:
    """The key of one part of one method's results."""
    key = {**common, "part": part, **{name: settings[name] for name in PART_SETTINGS[part]}}
    if PART_FORMAT[part] > 1:
        key["format"] = PART_FORMAT[part]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def common_key(
    method: Any, model: str, device: str, window: int, sink: int, model_dtype: str = "auto"
) -> dict:
    # only where set, so that the keys of methods decoded exactly stay as they were
    coarse = getattr(method, "coarse", None)
    return {
        **({"coarse": asdict(coarse)} if coarse is not None else {}),
        **({"model_dtype": model_dtype} if model_dtype != "auto" else {}),
        "method": method.name,
        "beam": method.beam,
        "keys": folder_digest(method.key_dir),
        "values": folder_digest(method.value_dir),
        "model": model_identity(model),
        "device": device,
        "window": window,
        "sink": sink,
        "commvq": __version__,
    }


def cache_file(output: Path, method: str) -> Path:
    return Path(output) / "cache" / f"{method}.json"


def load(output: Path, method: str) -> dict:
    """The parts kept for ``method`` (an unreadable file counts as none: it is recomputed)."""
    path = cache_file(output, method)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def hit(kept: dict, part: str, fp: str) -> dict | None:
    entry = kept.get(part)
    return entry if isinstance(entry, dict) and entry.get("fingerprint") == fp else None


def store(output: Path, method: str, kept: dict, part: str, fp: str, payload: dict) -> None:
    """Keep one part (written atomically, the method's other parts untouched)."""
    kept[part] = {"fingerprint": fp, **payload}
    path = cache_file(output, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, kept)
