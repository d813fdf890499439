"""A sharded, memory-mapped, resumable store of per-layer vectors (keys, values or queries).

Layout of one store directory::

    manifest.json            format, version, kind, layers, width, dtype, shards, settings
    L000/00000.safetensors   tensor "x" [tokens, width] (+ "pos" int32 [tokens] for queries)
    L000/00001.safetensors
    ...

A shard is written for every layer (each file under a temporary name, then renamed) before
the manifest, itself replaced atomically, lists it: a kill at any moment leaves the store at
its last listed shard. Readers memory-map shards (``safetensors.safe_open``) and read slices,
so no consumer needs a whole layer in RAM.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from commvq.fsutil import TMP_SUFFIX, atomic_path, remove_stale_tmp, write_json

FORMAT = "commvq-kv"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("key", "value", "query")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored; use one of {list(DTYPES)}")


def layer_dir(root: Path, layer: int) -> Path:
    return root / f"L{layer:03d}"


def shard_file(root: Path, layer: int, index: int) -> Path:
    return layer_dir(root, layer) / f"{index:05d}.safetensors"


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of ``root``, or None when there is none; a foreign file is an error."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); delete the folder or pass --overwrite"
        ) from e
    if man.get("format") != FORMAT:
        raise ValueError(f"{path} is not a commvq KV store manifest")
    if man.get("version", 0) > VERSION:
        raise ValueError(f"{path} has format version {man['version']}; upgrade commvq to read it")
    missing = [k for k in ("kind", "num_layers", "width", "dtype", "shards") if k not in man]
    if missing or man.get("kind") not in KINDS:
        raise ValueError(
            f"{path}: a damaged manifest (missing or unknown {missing or ['kind']}); "
            "collect again with --overwrite"
        )
    return man


def foreign_files(root: Path) -> list[Path]:
    """What under ``root`` is not a store's own: anything but layer folders of shard files and
    temporaries (a run killed or refused before its first manifest leaves only those)."""
    out = []
    for p in Path(root).iterdir():
        if p.is_dir() and re.fullmatch(r"L\d{3}", p.name):
            out += [
                q
                for q in p.iterdir()
                if not (re.fullmatch(r"\d{5}\.safetensors", q.name) or q.name.endswith(TMP_SUFFIX))
            ]
        elif not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)):
            out.append(p)
    return out


def shard_ok(path: Path, tokens: int, width: int) -> bool:
    """Whether a shard file opens and its ``x`` has the listed shape (safetensors checks that the
    file covers what its header lists, so a truncated file fails here)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return tuple(fh.get_slice("x").get_shape()) == (tokens, width)
    except Exception:
        return False


def bytes_per_token(num_layers: int, width: int, dtype: torch.dtype) -> int:
    return num_layers * width * torch.tensor([], dtype=dtype).element_size()


@dataclass(frozen=True)
class ShardInfo:
    tokens: int

    def to_dict(self) -> dict[str, int]:
        return {"tokens": self.tokens}


class KVStoreWriter:
    """Append shards to a store; resumes from what the manifest lists."""

    def __init__(
        self,
        root: Path,
        kind: str,
        num_layers: int,
        width: int,
        dtype: torch.dtype,
        settings: dict[str, Any],
        config: dict[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} must be one of {KINDS}")
        self.root = Path(root)
        self.kind, self.num_layers, self.width, self.dtype = kind, num_layers, width, dtype
        self.settings, self.config = settings, config or {}
        self.shards: list[ShardInfo] = []
        self.exhausted = False
        man = read_manifest(self.root)
        if man is not None:
            self._check_compatible(man)
            self.shards = [ShardInfo(**s) for s in man["shards"]]
            self.exhausted = bool(man.get("exhausted", False))
        elif self.root.exists():
            if foreign_files(self.root):
                raise ValueError(
                    f"{self.root} exists, is not empty and holds no {MANIFEST}: "
                    "choose another --output_dir"
                )
            shutil.rmtree(
                self.root
            )  # only unlisted shard files of a run stopped before its first manifest
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.root)

    def _check_compatible(self, man: dict[str, Any]) -> None:
        want = {
            "kind": self.kind,
            "num_layers": self.num_layers,
            "width": self.width,
            "dtype": dtype_name(self.dtype),
            **self.settings,
        }
        have = {
            "kind": man["kind"],
            "num_layers": man["num_layers"],
            "width": man["width"],
            "dtype": man["dtype"],
            **man.get("settings", {}),
        }
        for k, v in want.items():
            if have.get(k) != v:
                raise ValueError(
                    f"{self.root} holds data collected with {k}={have.get(k)!r}, not {v!r}: "
                    "choose another --output_dir or pass --overwrite"
                )

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def readable_shards(self) -> int:
        """How many of the listed shards, from the first, have every layer's file whole (opens and
        holds the listed rows): a resume starts again at the first that does not."""
        for i, s in enumerate(self.shards):
            if not all(
                shard_ok(shard_file(self.root, layer, i), s.tokens, self.width)
                for layer in range(self.num_layers)
            ):
                return i
        return len(self.shards)

    def truncate(self, num_shards: int) -> None:
        """Forget shards past ``num_shards`` (used to realign stores after a crash)."""
        if num_shards < len(self.shards):
            self.shards = self.shards[:num_shards]
            self.exhausted = False
            self._write_manifest()

    def write_shard(self, per_layer: list[dict[str, torch.Tensor]]) -> None:
        """Append one shard: ``per_layer[l]`` maps tensor names ("x", ...) to ``[n, ...]``."""
        n = self.write_files(len(self.shards), per_layer)
        self.shards.append(ShardInfo(tokens=n))
        self._write_manifest()

    def write_files(self, index: int, per_layer: list[dict[str, torch.Tensor]]) -> int:
        """Write the files of shard ``index`` (not yet listed in the manifest); return its rows."""
        if len(per_layer) != self.num_layers:
            raise ValueError(f"got {len(per_layer)} layers, store has {self.num_layers}")
        n = per_layer[0]["x"].shape[0]
        for layer, tensors in enumerate(per_layer):
            x = tensors["x"]
            if x.shape != (n, self.width):
                raise ValueError(
                    f"layer {layer}: shard shape {tuple(x.shape)} != ({n}, {self.width})"
                )
            out = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            out["x"] = out["x"].to(self.dtype)
            with atomic_path(shard_file(self.root, layer, index)) as tmp:
                save_file(out, str(tmp))
        return n

    def list_shards(self, tokens: list[int]) -> None:
        """Append shards whose files are written (by :meth:`write_files`) to the manifest."""
        self.shards.extend(ShardInfo(tokens=n) for n in tokens)
        self._write_manifest()

    def finish(self, exhausted: bool) -> None:
        self.exhausted = exhausted
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_json(
            self.root / MANIFEST,
            {
                "format": FORMAT,
                "version": VERSION,
                "kind": self.kind,
                "num_layers": self.num_layers,
                "width": self.width,
                "dtype": dtype_name(self.dtype),
                "num_tokens": self.num_tokens,
                "exhausted": self.exhausted,
                "shards": [s.to_dict() for s in self.shards],
                "settings": self.settings,
                "config": self.config,
            },
        )


def _sibling(root: Path, what: str) -> Path:
    return root.parent / f".{root.name}.{what}"


def thin(root: Path, every: int, settings: dict[str, Any]) -> None:
    """Keep every ``every``-th row of a store (rows counted from 0 across its shards, each shard
    keeping its place), with ``settings`` merged into the manifest's. The thinned store is written
    next to it and swapped in by two renames; :func:`recover` ends a swap that a kill interrupted,
    so the folder holds the old store or the new one, never a mixture."""
    root = Path(root)
    man = read_manifest(root)
    if man is None:
        raise ValueError(f"{root} is not a commvq KV store (no {MANIFEST})")
    new, old = _sibling(root, "thin"), _sibling(root, "old")
    shutil.rmtree(new, ignore_errors=True)
    writer = KVStoreWriter(
        new,
        man["kind"],
        man["num_layers"],
        man["width"],
        DTYPES[man["dtype"]],
        {**man.get("settings", {}), **settings},
        man.get("config"),
    )
    offset = 0
    for index, info in enumerate(man["shards"]):
        keep = torch.arange(info["tokens"])
        keep = keep[(keep + offset) % every == 0]
        per_layer = []
        for layer in range(man["num_layers"]):
            with safe_open(str(shard_file(root, layer, index)), framework="pt") as fh:
                per_layer.append({k: fh.get_tensor(k).index_select(0, keep) for k in fh.keys()})  # noqa: SIM118
        writer.write_shard(per_layer)
        offset += info["tokens"]
    writer.finish(bool(man.get("exhausted", False)))
    os.replace(root, old)
    os.replace(new, root)
    shutil.rmtree(old)


def recover(root: Path) -> None:
    """Finish or undo a :func:`thin` that was killed: a complete thinned store whose swap had begun
    takes the folder's place; an unfinished one and the replaced store are deleted."""
    root = Path(root)
    new, old = _sibling(root, "thin"), _sibling(root, "old")
    if not root.exists() and old.exists():  # killed between the two renames: the new store is whole
        os.replace(new, root)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def remove_store(root: Path) -> None:
    """Delete a store; refuses a folder that is not one (nothing foreign is ever deleted)."""
    root = Path(root)
    if not root.exists():
        return
    if read_manifest(root) is None and foreign_files(root):
        raise ValueError(f"{root} is not a commvq KV store (no {MANIFEST}); not deleting it")
    shutil.rmtree(root)


class KVStore:
    """Read-only view of a store directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        man = read_manifest(self.root)
        if man is None:
            raise FileNotFoundError(
                f"{self.root}: no KV data here ({MANIFEST} missing); run `commvq collect` first"
            )
        self.manifest = man
        self.kind: str = man["kind"]
        self.num_layers: int = man["num_layers"]
        self.width: int = man["width"]
        self.dtype: torch.dtype = DTYPES[man["dtype"]]
        self.shards = [ShardInfo(**s) for s in man["shards"]]
        self.settings: dict[str, Any] = man.get("settings", {})

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def shard_path(self, layer: int, index: int) -> Path:
        return shard_file(self.root, layer, index)

    def layer(self, layer: int) -> LayerData:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} out of range: the store has {self.num_layers} layers")
        return LayerData(self, layer)


class LayerData:
    """The vectors of one layer across shards, read lazily by slices."""

    def __init__(self, store: KVStore, layer: int) -> None:
        self.store, self.layer = store, layer
        self.offsets = [0]
        for s in store.shards:
            self.offsets.append(self.offsets[-1] + s.tokens)

    def __len__(self) -> int:
        return self.offsets[-1]

    def _open_slice(self, index: int, lo: int, hi: int, name: str = "x") -> torch.Tensor:
        path = self.store.shard_path(self.layer, index)
        want = self.store.shards[index].tokens
        try:
            with safe_open(str(path), framework="pt") as fh:
                sl = fh.get_slice(name)
                shape = tuple(sl.get_shape())
                if name == "x" and shape != (want, self.store.width):
                    raise ValueError(f"shape {shape}, manifest says ({want}, {self.store.width})")
                return sl[lo:hi]
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard {path} is missing; re-run `commvq collect` to redo it"
            ) from None
        except Exception as e:
            raise ValueError(
                f"corrupt shard {path} ({e}); re-run `commvq collect` with the same options: it "
                "redoes this shard and the ones after it"
            ) from e

    def read(self, start: int = 0, stop: int | None = None, name: str = "x") -> torch.Tensor:
        """Rows ``[start, stop)`` across shards as one tensor."""
        stop = len(self) if stop is None else min(stop, len(self))
        parts = []
        for i in range(len(self.store.shards)):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo < hi:
                parts.append(self._open_slice(i, lo - self.offsets[i], hi - self.offsets[i], name))
        if not parts:
            return torch.empty(0, self.store.width, dtype=self.store.dtype)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def shard_chunks(
        self, chunk: int = 65536, limit: int | None = None
    ) -> Iterator[tuple[Path, torch.Tensor]]:
        """``(shard path, rows)`` pieces of at most ``chunk`` rows, in order, up to ``limit``
        rows."""
        limit = len(self) if limit is None else min(limit, len(self))
        for i in range(len(self.store.shards)):
            lo, hi = self.offsets[i], min(self.offsets[i + 1], limit)
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                yield self.store.shard_path(self.layer, i), self._open_slice(i, a - lo, b - lo)

    def num_chunks(self, chunk: int, limit: int | None = None) -> int:
        limit = len(self) if limit is None else min(limit, len(self))
        return sum(
            math.ceil(max(0, min(self.offsets[i + 1], limit) - self.offsets[i]) / chunk)
            for i in range(len(self.store.shards))
        )
