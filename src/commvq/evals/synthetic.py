"""Synthetic long-context retrieval built offline: passkey retrieval and needle in a haystack."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PASSKEY_INTRO = (
    "A long stretch of filler text follows. Somewhere inside it there is one important number, "
    "the pass key. Read carefully and remember it.\n"
)
FILLER = "The river runs to the sea. The hills are quiet at dusk. Birds fly home before the night. "
PASSKEY_LINE = "Important: the pass key is {key}. Remember the pass key {key}. "
PASSKEY_QUESTION = "\nQuestion: what is the pass key? Answer: the pass key is"
NEEDLE = (
    "The secret ingredient of the famous Springfield sandwich is roasted fennel, "
    "according to the cook who invented it. "
)
NEEDLE_QUESTION = (
    "\nQuestion: what is the secret ingredient of the famous Springfield sandwich? Answer: it is"
)
NEEDLE_ANSWER = "fennel"


@dataclass(frozen=True)
class Probe:
    ids: list[int]
    answer: str
    length: int
    depth: float


def _fit(
    encode: Callable[[str], list[int]],
    intro: str,
    body: list[int],
    insert: str,
    question: str,
    length: int,
    depth: float,
) -> list[int]:
    """``intro + body[:k] + insert + body[k:m] + question`` of exactly ``length`` tokens."""
    head, ins, tail = encode(intro), encode(insert), encode(question)
    room = length - len(head) - len(ins) - len(tail)
    if room < 1:
        raise ValueError(
            f"length {length} is too short for the probe; use at least {length - room + 1}"
        )
    filler = (body * (room // max(1, len(body)) + 1))[:room]
    cut = int(round(depth * room))
    return head + filler[:cut] + ins + filler[cut:] + tail


def passkey_probes(
    encode: Callable[[str], list[int]],
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int = 0,
) -> list[Probe]:
    rng = random.Random(seed)
    body = encode(FILLER * 8)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                key = str(rng.randint(10000, 99999))
                ids = _fit(
                    encode,
                    PASSKEY_INTRO,
                    body,
                    PASSKEY_LINE.format(key=key),
                    PASSKEY_QUESTION,
                    length,
                    depth,
                )
                out.append(Probe(ids, key, length, depth))
    return out


def needle_probes(
    encode: Callable[[str], list[int]],
    haystack: str,
    lengths: list[int],
    depths: list[float],
    samples: int = 1,
    seed: int = 0,
) -> list[Probe]:
    """One needle per (length, depth, sample). Sample 0 reads the haystack from its start; each
    further sample from a seeded random token offset (wrapping around), so the needle sits in
    different text while the grid of lengths and depths stays the same."""
    body = encode(haystack)
    rng = random.Random(seed)
    offsets = [0] + [rng.randrange(len(body)) for _ in range(samples - 1)]
    return [
        Probe(
            _fit(encode, "", body[o:] + body[:o], NEEDLE, NEEDLE_QUESTION, length, depth),
            NEEDLE_ANSWER,
            length,
            depth,
        )
        for length in lengths
        for depth in depths
        for o in offsets
    ]


@dataclass(frozen=True)
class Prefill:
    """An exact prefill of a probe: every layer's keys (after RoPE) and values, and the greedy
    first token its last position gives."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    first: int


def takes_prefill(cache: Any) -> bool:
    """Whether ``cache`` can hold a shared :func:`exact_prefill` (it attends exactly at prefill)."""
    layers = getattr(cache, "layers", [])
    return callable(getattr(cache, "load_prefill", None)) and not any(
        getattr(layer, "quantize_prefill", True) for layer in layers
    )


@torch.no_grad()
def exact_prefill(model: Any, probe: Probe) -> Prefill:
    """One forward pass over the probe with transformers' exact cache."""
    from commvq.integrations.hf.attention import cache_kwargs, exact_cache

    ids = torch.tensor([probe.ids], device=model.device)
    cache = exact_cache()
    logits = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]
    keys = [layer.keys for layer in cache.layers]
    return Prefill(keys, [layer.values for layer in cache.layers], int(logits.argmax()))


@torch.no_grad()
def answer(
    model: Any,
    tokenizer: Any,
    probe: Probe,
    cache: Any,
    max_new_tokens: int = 8,
    prefill: Prefill | None = None,
) -> tuple[bool, str]:
    """Greedy continuation of the probe with ``cache``; correct if it contains the answer.

    ``prefill``: the probe's :func:`exact_prefill`, shared by every cache that attends exactly at
    prefill (``cache.load_prefill``): the same tokens as prefilling through ``cache``, one forward
    pass of the prompt for all of them."""
    from commvq.integrations.hf.attention import cache_kwargs

    ids = torch.tensor([probe.ids], device=model.device)
    first: list[int] = []
    if prefill is not None:
        cache.load_prefill(prefill.keys, prefill.values)
        first = [prefill.first]
        ids = torch.cat((ids, torch.tensor([first], device=model.device)), 1)
        max_new_tokens -= 1
    new = ids.new_zeros(1, 0)
    if max_new_tokens > 0 and not (first and first[0] == tokenizer.eos_token_id):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            **cache_kwargs(model, cache),
        )
        new = out[:, ids.shape[1] :]
    tokens = first + new[0].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return probe.answer.lower() in text.lower(), text


def heatmap(
    path,
    results: dict[str, dict[tuple[int, float], float]],
    lengths: list[int],
    depths: list[float],
    title: str,
    count: int = 1,
    what: str = "needle",
) -> None:
    """Accuracy per (depth, length) as a PNG: one panel per method in a grid of at most four
    columns, each cell showing its correct probes out of ``count``, and one colour bar."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from commvq.fsutil import atomic_path

    cols = min(4, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols + 1.2, 2.9 * rows + 0.8), squeeze=False
    )
    image = None
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    for ax, (name, acc) in zip(axes.flat, results.items(), strict=False):
        grid = [[acc.get((length, depth), float("nan")) for length in lengths] for depth in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                if v == v:  # not NaN: a cell that was probed
                    ax.text(
                        x, y, f"{round(v * count)}/{count}", ha="center", va="center", fontsize=10
                    )
        ax.set_xticks(range(len(lengths)), [f"{v:,}" for v in lengths], fontsize=9)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=9)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("context tokens", fontsize=9)
        ax.set_ylabel(f"{what} depth", fontsize=9)
    fig.suptitle(f"{title}: correct probes per cell", fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes.flat), fraction=0.025, pad=0.02)
        bar.set_label("accuracy", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
