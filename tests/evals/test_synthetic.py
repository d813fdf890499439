"""Retrieval probes: exact lengths, the answer where the depth puts it, samples that differ."""

from __future__ import annotations

import zlib

from commvq.evals import synthetic

WORDS = [f"w{i}" for i in range(300)]


def encode(text: str) -> list[int]:
    """A toy tokenizer: one id per whitespace-separated word (ids stable across calls)."""
    return [zlib.crc32(word.encode()) % 100_003 for word in text.split()]


HAYSTACK = " ".join(WORDS)


def needle_at(probe: synthetic.Probe) -> int:
    ins = encode(synthetic.NEEDLE)
    return next(i for i in range(len(probe.ids)) if probe.ids[i : i + len(ins)] == ins)


def test_needles_have_exact_lengths_and_depths():
    probes = synthetic.needle_probes(
        encode, HAYSTACK, [80, 200], [0.0, 0.5, 1.0], samples=3, seed=1
    )
    assert len(probes) == 2 * 3 * 3
    room_extra = len(encode(synthetic.NEEDLE)) + len(encode(synthetic.NEEDLE_QUESTION))
    for p in probes:
        assert len(p.ids) == p.length and p.answer == synthetic.NEEDLE_ANSWER
        room = p.length - room_extra
        assert needle_at(p) == round(p.depth * room)
        assert p.ids[-len(encode(synthetic.NEEDLE_QUESTION)) :] == encode(synthetic.NEEDLE_QUESTION)


def test_needle_samples_move_through_the_haystack():
    one = synthetic.needle_probes(encode, HAYSTACK, [120], [0.5])
    three = synthetic.needle_probes(encode, HAYSTACK, [120], [0.5], samples=3, seed=0)
    assert three[0] == one[0]  # sample 0 is the probe without samples
    assert len({tuple(p.ids) for p in three}) == 3  # the others read other text
    again = synthetic.needle_probes(encode, HAYSTACK, [120], [0.5], samples=3, seed=0)
    assert again == three
    other = synthetic.needle_probes(encode, HAYSTACK, [120], [0.5], samples=3, seed=5)
    assert other[1:] != three[1:]


def test_passkeys_hold_their_key():
    probes = synthetic.passkey_probes(encode, [100], [0.0, 1.0], samples=2, seed=3)
    assert len(probes) == 4
    for p in probes:
        assert len(p.ids) == 100
        line = encode(synthetic.PASSKEY_LINE.format(key=p.answer))
        assert any(p.ids[i : i + len(line)] == line for i in range(len(p.ids)))
