"""Named cache methods for evaluation: ``fp16``, ``kivi2``, ``kivi1``, ``commvq-{em,e2e}{2,1}``
(codebooks and value codecs found in a working folder), ``commvq`` from explicit folders, and
transformers' own quantized cache ``hf-quanto{2,4}`` (where optimum-quanto is installed).
A CommVQ method may end in ``@B``: its keys encoded with a beam of width ``B`` instead of the
width its codebooks were trained for (``commvq-em2@8``: the paper's EM codebooks, beam 8), and in
``+coarse``: decoded coarse to fine (``commvq-e2e2+coarse``; :mod:`commvq.quant.coarse`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from commvq import io

BASELINES = ("fp16", "kivi2", "kivi1")
HF_QUANTIZED = {
    "hf-quanto2": ("quanto", 2),
    "hf-quanto4": ("quanto", 4),
}  # transformers' QuantizedCache
# the default comparison, in table order
ALL = "fp16,kivi2,kivi1,commvq-em2,commvq-e2e2,commvq-em1,commvq-e2e1"


@dataclass(frozen=True)
class Method:
    name: str
    key_dir: Path | None = None
    value_dir: Path | None = None
    beam: int | None = None  # the key encoder's beam width (None: the codebooks' own)
    coarse: Any = None  # CoarseSettings: decode coarse to fine (None: exact)
    # the loaded codebooks and codec, per model: read from disk once, shared by every cache made
    loaded: dict = field(default_factory=dict, compare=False, repr=False)

    def make_cache(self, model: Any, window: int, sink: int = 0):
        from commvq.integrations.hf.cache import CommVQCache

        if self.name in BASELINES:
            return CommVQCache.baseline(model, self.name, window=window, sink=sink)
        if self.name in HF_QUANTIZED:
            from commvq.integrations.hf.quantized import make_cache

            return make_cache(model, *HF_QUANTIZED[self.name], window)
        if self.loaded.get("model") is not model:
            first = CommVQCache.from_pretrained(
                model,
                self.key_dir,
                self.value_dir,
                window=window,
                sink=sink,
                beam=self.beam,
                decode="exact" if self.coarse is None else "coarse",
                coarse=self.coarse,
            )
            parts = (len(first.layers), first.keys_part, first.values_part)
            self.loaded.update(model=model, parts=parts)
            return first
        layers, keys, values = self.loaded["parts"]
        return CommVQCache(layers, keys, values, window=window, sink=sink, coarse=self.coarse)

    @property
    def exact_mode(self) -> str | None:
        """For a ``+coarse`` method, the name of the same method decoded exactly."""
        return self.name.removesuffix(COARSE) if self.coarse is not None else None


def find_key_dir(workdir: Path, method: str, bits: int) -> Path:
    """The codebook folder under ``workdir`` trained by ``method`` at about ``bits`` per channel."""
    for cfg_path in sorted(workdir.glob("codebook*/config.json")):
        cfg = io.read_config(cfg_path.parent)
        if (
            cfg
            and cfg["method"] == method
            and round(cfg["bits_per_channel"]) == bits
            and cfg.get("layers")
        ):
            return cfg_path.parent
    raise FileNotFoundError(
        f"no {method} key codebooks of {bits} bit(s) in {workdir}: run "
        f"`commvq train-keys --method {method} --quant_bits {bits}` there"
    )


def find_value_dir(workdir: Path, bits: int) -> Path:
    for cfg_path in sorted(workdir.glob("value_codec*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("quant_bits") == bits:
            return cfg_path.parent
    raise FileNotFoundError(
        f"no {bits}-bit value codec in {workdir}: run `commvq train-values --quant_bits {bits}`"
    )


COARSE = "+coarse"


def split_beam(name: str) -> tuple[str, int | None]:
    """``"commvq-em2@8"`` -> ``("commvq-em2", 8)``; no suffix -> ``(name, None)``."""
    if "@" not in name:
        return name, None
    base, _, width = name.partition("@")
    if not width.isdigit() or int(width) < 1:
        raise ValueError(
            f"method {name!r}: the beam width after @ must be a whole number of 1 or more"
        )
    return base, int(width)


def resolve(
    names: list[str],
    workdir: Path,
    key_dir: Path | None = None,
    value_dir: Path | None = None,
    coarse: Any = None,
) -> list[Method]:
    """``coarse``: the settings of the ``+coarse`` methods (default ``CoarseSettings()``)."""
    from commvq.quant.coarse import CoarseSettings

    out = []
    for full in names:
        is_coarse = full.endswith(COARSE)
        name, beam = split_beam(full.removesuffix(COARSE))
        if is_coarse and not name.startswith("commvq"):
            raise ValueError(f"method {full!r}: +coarse applies to CommVQ methods only")
        if beam is not None and not name.startswith("commvq"):
            raise ValueError(f"method {full!r}: a beam width (@B) applies to CommVQ methods only")
        if name in BASELINES or name in HF_QUANTIZED:
            out.append(Method(name))
        elif name == "commvq":
            if key_dir is None and value_dir is None:
                raise ValueError("method 'commvq' needs --key_dir and/or --value_dir")
            if key_dir is None and is_coarse:
                raise ValueError(f"method {full!r}: coarse decoding needs --key_dir")
            out.append(Method(full, key_dir, value_dir, beam))
        elif name.startswith("commvq-") and name[7:-1] in ("em", "e2e") and name[-1] in "12":
            bits = int(name[-1])
            out.append(
                Method(
                    full,
                    find_key_dir(workdir, name[7:-1], bits),
                    find_value_dir(workdir, bits),
                    beam,
                )
            )
        else:
            raise ValueError(
                f"unknown method {name!r}: use {', '.join(BASELINES + tuple(HF_QUANTIZED))}, "
                "commvq-em2, commvq-e2e2, commvq-em1, commvq-e2e1 or commvq (with "
                "--key_dir/--value_dir); any CommVQ one may end in @B and/or +coarse"
            )
    return [
        replace(m, coarse=coarse or CoarseSettings()) if m.name.endswith(COARSE) else m for m in out
    ]
