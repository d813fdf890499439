"""Key codebook files, in the reference layout, plus a versioned ``config.json``.

Directory ``codebook[_e2e]_{code_bits}bits_{head_dim}group_{R}residuals/`` holds one file
``{layer:03d}_{head}.pt`` per (layer, KV head)::

    {"final_error": float, "steps": [{"mse_loss": 0-d tensor, "theta": float32 [2E, P],
                                      "clustering_centers": float32 [E*E, D] (optional)}] * R}

Untied tables (:func:`commvq.quant.commutative.untie`) store ``theta`` as float32 ``[4E, P]``: the
A table's rows, then the B table's, each in the layout above (a reference reader that takes only
``clustering_centers`` reads them too).

``clustering_centers`` are the materialized codewords, index ``A*E + B``, columns interleaved
``re_f0, im_f0, re_f1, ...``. Files hold CPU tensors only and load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from commvq import __version__
from commvq.codecs.key_codebook import KeyCodebook
from commvq.fsutil import atomic_path, write_json
from commvq.quant.commutative import (
    codewords,
    interleave_pairs,
    is_untied,
    join_theta,
    num_entries,
    split_theta,
)
from commvq.spec import ModelSpec

CODEBOOK_FORMAT = "commvq-key-codebook"
CODEBOOK_VERSION = 1
CONFIG = "config.json"
METHODS = ("em", "e2e")
_NAME = re.compile(r"^codebook(_e2e)?_(\d+)bits_(\d+)group_(\d+)residuals$")


@dataclass(frozen=True)
class CodebookLayout:
    code_bits: int
    head_dim: int
    residuals: int
    e2e: bool = False

    def __post_init__(self) -> None:
        num_entries(self.code_bits)  # validates
        if self.residuals < 1 or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"invalid codebook layout {self}")

    @property
    def dir_name(self) -> str:
        prefix = "codebook_e2e" if self.e2e else "codebook"
        return f"{prefix}_{self.code_bits}bits_{self.head_dim}group_{self.residuals}residuals"

    @property
    def bits_per_channel(self) -> float:
        return self.code_bits * self.residuals / self.head_dim


def parse_dir_name(name: str) -> CodebookLayout | None:
    """The layout a directory name states, or None if it is not in the pattern."""
    m = _NAME.match(name)
    if not m:
        return None
    return CodebookLayout(int(m[2]), int(m[3]), int(m[4]), e2e=bool(m[1]))


def head_file(folder: Path, layer: int, head: int) -> Path:
    return Path(folder) / f"{layer:03d}_{head}.pt"


def save_head(
    path: Path,
    thetas: torch.Tensor,
    stage_mse: torch.Tensor,
    final_error: float,
    with_centers: bool = False,
) -> None:
    """Write one (layer, head) file atomically; ``thetas [R, 2E, P]`` (complex for untied tables),
    ``stage_mse [R]``. Codebooks holding NaN or Inf are never written."""
    if not bool(torch.isfinite(thetas).all()):
        raise FloatingPointError(f"{path}: the codebooks hold NaN or Inf; not saved")
    steps = []
    for r in range(thetas.shape[0]):
        th = thetas[r].detach().cpu()
        if is_untied(th):
            th = join_theta(th.real, th.imag)  # [4E, P]: the A table's rows, then the B table's
        th = th.float().clone()  # its own storage: a view would save all of thetas
        step: dict[str, Any] = {"mse_loss": torch.tensor(float(stage_mse[r])), "theta": th}
        if with_centers:
            full = thetas[r].detach().cpu()[None]
            step["clustering_centers"] = interleave_pairs(codewords(full)[0]).contiguous()
        steps.append(step)
    with atomic_path(path) as tmp:
        torch.save({"final_error": float(final_error), "steps": steps}, tmp)


def load_head(path: Path) -> tuple[torch.Tensor, float]:
    """``(thetas [R, 2E, P], final_error)`` from one file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: codebook file missing; train it with `commvq train-keys`")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        thetas = torch.stack([s["theta"].float() for s in data["steps"]])
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable codebook file ({str(e) or type(e).__name__}); "
            "retrain its layer (`commvq train-keys --layers L --overwrite`)"
        ) from e
    if not bool(torch.isfinite(thetas).all()):
        raise ValueError(
            f"{path}: the codebooks hold NaN or Inf; retrain its layer "
            "(`commvq train-keys --layers L --overwrite`)"
        )
    return thetas, float(data["final_error"])


def read_config(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if cfg.get("format") != CODEBOOK_FORMAT:
        raise ValueError(f"{path} is not a commvq key codebook config")
    if cfg.get("version", 0) > CODEBOOK_VERSION:
        raise ValueError(f"{path} has version {cfg['version']}; upgrade commvq to read it")
    return cfg


def write_config(
    folder: Path, layout: CodebookLayout, method: str, spec: ModelSpec, extra: dict[str, Any]
) -> None:
    write_json(
        Path(folder) / CONFIG,
        {
            "format": CODEBOOK_FORMAT,
            "version": CODEBOOK_VERSION,
            "commvq": __version__,
            "method": method,
            **asdict(layout),
            "bits_per_channel": layout.bits_per_channel,
            "num_layers": spec.num_layers,
            "num_kv_heads": spec.num_kv_heads,
            "spec": spec.to_dict(),
            **extra,
        },
    )


def encode_beam(folder: Path) -> int:
    """The encoder's beam width a codebook folder was trained for (1, greedy, when it says none)."""
    cfg = read_config(folder)
    beam = int(cfg.get("beam", 1)) if cfg else 1
    if beam < 1:
        raise ValueError(f"{Path(folder) / CONFIG}: beam {beam} must be at least 1")
    return beam


def layout_of(folder: Path) -> tuple[CodebookLayout, dict[str, Any] | None]:
    """A directory's layout, from its config.json, else from its name."""
    folder = Path(folder)
    cfg = read_config(folder)
    if cfg is not None:
        return CodebookLayout(
            cfg["code_bits"], cfg["head_dim"], cfg["residuals"], cfg["method"] == "e2e"
        ), cfg
    parsed = parse_dir_name(folder.name)
    if parsed is None:
        raise ValueError(
            f"{folder}: no {CONFIG} and the name is not "
            "codebook[_e2e]_<b>bits_<D>group_<R>residuals"
        )
    return parsed, None


def check_fits(folder: Path, spec: ModelSpec) -> CodebookLayout:
    """Refuse a codebook directory whose settings do not fit the model, naming the mismatch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such codebook directory")
    layout, cfg = layout_of(folder)
    if layout.head_dim != spec.head_dim:
        raise ValueError(
            f"{folder}: codebooks for head_dim {layout.head_dim}, the model has {spec.head_dim}"
        )
    if cfg is not None:
        for key, have in (("num_kv_heads", spec.num_kv_heads), ("num_layers", spec.num_layers)):
            if cfg.get(key) != have:
                raise ValueError(
                    f"{folder}: codebooks for {key}={cfg.get(key)}, the model has {have}"
                )
    return layout


def file_tables(thetas: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Stacked ``theta`` of a file as the code reads it: ``[..., 4E, P]`` (untied tables, as
    :func:`save_head` writes them) becomes complex ``[..., 2E, P]``; tied theta stays as it is."""
    if thetas.shape[-2] == 4 * num_entries(code_bits):
        return torch.complex(*split_theta(thetas))
    return thetas


def load_layer(folder: Path, layer: int, spec: ModelSpec) -> torch.Tensor:
    """``thetas [H_kv, R, 2E, P]`` of one layer (complex for untied tables), checked against the
    model."""
    layout = check_fits(folder, spec)
    out = []
    e = num_entries(layout.code_bits)
    tied = (layout.residuals, 2 * e, spec.head_dim // 2)
    for head in range(spec.num_kv_heads):
        thetas, _ = load_head(head_file(folder, layer, head))
        if thetas.shape == (layout.residuals, 4 * e, spec.head_dim // 2):
            thetas = file_tables(thetas, layout.code_bits)  # untied: A rows, then B rows
        elif thetas.shape != tied:
            raise ValueError(
                f"{head_file(folder, layer, head)}: theta shape {tuple(thetas.shape)} does not fit "
                f"{layout.dir_name} (expected {tied}, or {tied[:1] + (4 * e,) + tied[2:]} for "
                "untied tables)"
            )
        out.append(thetas)
    if len({t.dtype for t in out}) > 1:
        raise ValueError(f"{folder}: layer {layer} mixes tied and untied heads; retrain it")
    return torch.stack(out)


def load_key_codebook(
    folder: str | Path, layer: int, spec: ModelSpec, beam: int | None = None
) -> KeyCodebook:
    """One layer's :class:`KeyCodebook` from a codebook folder; ``beam`` None takes the width the
    folder's config.json records."""
    layout = check_fits(Path(folder), spec)
    if beam is None:
        beam = encode_beam(Path(folder))
    return KeyCodebook(load_layer(Path(folder), layer, spec), layout.code_bits, beam)
