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


@torch.no_grad()
def answer(
    model: Any, tokenizer: Any, probe: Probe, cache: Any, max_new_tokens: int = 8
) -> tuple[bool, str]:
    """Greedy continuation of the probe with ``cache``; correct if it contains the answer."""
    from commvq.integrations.hf.attention import cache_kwargs

    ids = torch.tensor([probe.ids], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        **cache_kwargs(model, cache),
    )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return probe.answer.lower() in text.lower(), text


def heatmap(
    path,
    results: dict[str, dict[tuple[int, float], float]],
    lengths: list[int],
    depths: list[float],
    title: str,
) -> None:
    """Accuracy per (depth, length), one panel per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from commvq.fsutil import atomic_path

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2), squeeze=False)
    for ax, (name, acc) in zip(axes[0], results.items(), strict=True):
        grid = [[acc.get((length, depth), float("nan")) for length in lengths] for depth in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(v) for v in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("context tokens", fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
