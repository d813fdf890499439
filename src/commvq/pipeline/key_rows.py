"""Which rows of a layer's collected keys train, validate and evaluate key codebooks, and the
held-out errors of saved codebooks on them (the same for every method)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from commvq import io
from commvq.codecs.key_codebook import KeyCodebook
from commvq.data.kvstore import KVStore
from commvq.evals.keys import key_errors
from commvq.spec import ModelSpec

log = logging.getLogger("commvq")
# rows after the training samples on which config.json's key errors are measured
EVAL_SAMPLES = 16384


def split_rows(
    samples: int, available: int, holdout: float, eval_samples: int
) -> dict[str, list[int]]:
    """Row ranges ``[start, stop)`` of one layer's keys: ``train`` (both methods train on these),
    ``validation`` (the last ``holdout`` of the ``samples``; E2E picks its best round there) and
    ``eval`` (the rows after the samples, which neither method saw, when the store has them; else
    the validation rows), where the key error in config.json is measured."""
    n_val = max(1, int(samples * holdout))
    rows = {"train": [0, samples - n_val], "validation": [samples - n_val, samples]}
    rows["eval"] = (
        [samples, min(available, samples + eval_samples)]
        if available > samples
        else rows["validation"]
    )
    return rows


def finite_rows(keys: torch.Tensor, layer: int, what: str) -> torch.Tensor:
    """``[N]`` mask of the rows without NaN/Inf; the others are dropped with a warning that counts
    them."""
    finite = torch.isfinite(keys).all(-1)
    bad = int((~finite).sum())
    if bad:
        log.warning(
            "train-keys: layer %d: dropping %d of %d %s key vectors that hold NaN or Inf",
            layer,
            bad,
            keys.shape[0],
            what,
        )
    return finite


def heldout_errors(
    store: KVStore,
    layer: int,
    rows: list[int],
    out: Path,
    layout: io.CodebookLayout,
    spec: ModelSpec,
    beam: int,
    device: torch.device,
) -> dict[str, float]:
    """Relative key MSE ``sum |k - k_hat|^2 / sum |k|^2`` of the saved codebooks on ``rows``, as
    `compare-codebooks` measures it: with the trained beam, and greedy."""
    keys = store.layer(layer).read(*rows).float().to(device)
    keys = keys[finite_rows(keys, layer, "held-out")]
    thetas = torch.stack(
        [io.load_head(io.head_file(out, layer, h))[0] for h in range(spec.num_kv_heads)]
    )
    thetas = io.file_tables(thetas, layout.code_bits)
    book = KeyCodebook(thetas, layout.code_bits, beam).to(device)
    out_err = {"relative_mse": key_errors(keys, book)["relative_mse"]}
    if beam > 1:
        out_err["relative_mse_greedy"] = key_errors(keys, book.with_beam(1))["relative_mse"]
    return out_err
