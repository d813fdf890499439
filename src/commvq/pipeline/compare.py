"""Stage `compare-codebooks`: per-layer key errors of codebook directories side by side.

Evaluates on keys the codebooks were not trained on: the tokens after the first ``samples`` the
training used (from each directory's config.json), or all of a store collected from the held-out
split (``commvq collect --split heldout``). Columns are the directories' names, with as many parent
folders as it takes to tell them apart.
Writes ``compare.json``, ``compare.md`` and ``compare.png`` to ``--output``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from commvq import io
from commvq.config import option, to_dict
from commvq.data.kvstore import KVStore
from commvq.distributed import device_for_rank
from commvq.evals.keys import key_errors, pair_weights
from commvq.fsutil import atomic_path, write_json
from commvq.pipeline.collect import store_dirs
from commvq.spec import ModelSpec

log = logging.getLogger("commvq")


@dataclass(frozen=True)
class CompareConfig:
    dirs: list[Path] = option([], "codebook directories to compare", positional=True)
    key_dir: Path = option(
        Path("data/key"), "keys to evaluate on (queries from its sibling 'query' if present)"
    )
    eval_samples: int = option(16384, "held-out key vectors per layer")
    output: Path = option(Path("compare"), "folder for compare.json / .md / .png")
    beam: int = option(
        0, "key encoder's beam width for every folder (0: each folder's own, from its config.json)"
    )
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dirs", [Path(d) for d in self.dirs])
        if not self.dirs:
            raise ValueError("give at least one codebook directory")
        if self.eval_samples < 1:
            raise ValueError(f"--eval_samples {self.eval_samples}: must be at least 1")
        if self.beam < 0:
            raise ValueError(f"--beam {self.beam}: 0 (each folder's own) or a width of 1 or more")


def column_names(dirs: list[Path]) -> list[str]:
    """Each directory's name, lengthened by parent folders until no two are the same."""
    parts = [Path(d).absolute().parts for d in dirs]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


def rows_trained(configs: list[dict], layer: int) -> int:
    """How many of the store's first rows any folder trained (or validated) this layer on: its
    per-layer record where there is one (folders can mix runs of other --num_samples), else the
    folder's ``samples``."""
    out = 0
    for c in configs:
        info = c.get("layers", {}).get(str(layer), {})
        if "rows" in info:
            out = max(out, int(info["rows"]["validation"][1]), int(info["rows"]["train"][1]))
        else:
            out = max(out, int(info.get("samples", c.get("samples", 0))))
    return out


def eval_range(store: KVStore, trained: int, want: int) -> tuple[int, int]:
    """Held-out rows ``[start, stop)``: the store's first rows if it holds the held-out split, else
    the rows after the training rows when the store has them."""
    if store.settings.get("split") == "heldout":
        return 0, min(store.num_tokens, want)
    if store.num_tokens > trained:
        return trained, min(store.num_tokens, trained + want)
    log.warning(
        "compare: %s has no keys beyond the %d used for training; evaluating on training keys",
        store.root,
        trained,
    )
    return max(0, store.num_tokens - want), store.num_tokens


def fingerprint(cfg: CompareConfig) -> str:
    """What decides a comparison: its settings, the codebook folders' files and the key store's
    manifests (keys and queries)."""
    from commvq.pipeline.eval_cache import folder_digest

    dirs = store_dirs(cfg.key_dir)
    manifests = [
        (d / "manifest.json").read_text() if (d / "manifest.json").is_file() else None
        for d in (dirs["key"], dirs["query"])
    ]
    key = {
        "config": to_dict(cfg),
        "codebooks": [folder_digest(d) for d in cfg.dirs],
        "stores": manifests,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def kept_report(out: Path, fp: str) -> str | None:
    """The report a previous run with the same fingerprint wrote, or None."""
    try:
        same = json.loads((out / "compare.json").read_text()).get("fingerprint") == fp
        return (out / "compare.md").read_text() if same else None
    except (OSError, ValueError):
        return None


def run(cfg: CompareConfig) -> Path:
    fp = fingerprint(cfg)
    kept = kept_report(cfg.output, fp)
    if kept is not None:  # nothing that decides it changed: a rerun prints what it wrote
        log.info("compare-codebooks: nothing changed since %s was written; kept", cfg.output)
        print(kept, end="")
        return cfg.output
    store = KVStore(cfg.key_dir)
    spec = ModelSpec.from_dict(store.settings["spec"])
    configs = []
    for d in cfg.dirs:
        io.check_fits(d, spec)
        configs.append(io.read_config(d) or {})
    qdir = store_dirs(cfg.key_dir)["query"]
    queries = KVStore(qdir) if (qdir / "manifest.json").is_file() else None
    device = device_for_rank(cfg.device)
    names = column_names(cfg.dirs)
    rows = []
    for layer in range(spec.num_layers):
        present = [
            d
            for d in cfg.dirs
            if all(io.head_file(d, layer, h).is_file() for h in range(spec.num_kv_heads))
        ]
        if not present:
            continue
        start, stop = eval_range(store, rows_trained(configs, layer), cfg.eval_samples)
        keys = store.layer(layer).read(start, stop).to(device)
        w = None
        if queries is not None:
            w = pair_weights(
                queries.layer(layer).read().to(device), spec.num_kv_heads, spec.head_dim
            )
        row = {"layer": layer, "eval_rows": [start, stop]}
        for name, d in zip(names, cfg.dirs, strict=True):
            if d not in present:
                continue
            cb = io.load_key_codebook(d, layer, spec, cfg.beam or None).to(device)
            row[name] = key_errors(keys, cb, w)
        rows.append(row)
    beams = {name: cfg.beam or io.encode_beam(d) for name, d in zip(names, cfg.dirs, strict=True)}
    spans = sorted({tuple(r["eval_rows"]) for r in rows})
    return write_report(
        cfg,
        names,
        rows,
        {
            "eval_rows": list(spans[0]) if len(spans) == 1 else "per layer",
            "key_dir": str(cfg.key_dir),
            "query_weighted": queries is not None,
            "beams": beams,
            "fingerprint": fp,
        },
    )


def _table(names: list[str], rows: list[dict], metric: str) -> list[str]:
    lines = ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = [f"{row[n][metric]:.5f}" if n in row else "-" for n in names]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    means = []
    for n in names:
        vals = [row[n][metric] for row in rows if n in row]
        means.append(f"**{sum(vals) / len(vals):.5f}**" if vals else "-")
    lines.append("| mean | " + " | ".join(means) + " |")
    return lines


def write_report(cfg: CompareConfig, names: list[str], rows: list[dict], meta: dict) -> Path:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    metrics = ["relative_mse"] + (["relative_logit_error"] if meta["query_weighted"] else [])
    where = (
        f"rows {meta['eval_rows'][0]}..{meta['eval_rows'][1]}"
        if meta["eval_rows"] != "per layer"
        else "per layer, the rows after those its codebooks trained on (compare.json)"
    )
    md = [
        f"Held-out keys: {where} of {meta['key_dir']}; key encoder's "
        "beam width: " + ", ".join(f"{n} {b}" for n, b in meta["beams"].items()) + ".",
        "",
    ]
    for metric in metrics:
        md += [f"### {metric}", "", *_table(names, rows, metric), ""]
    text = "\n".join(md)
    print(text)
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(text + "\n")
    write_json(out / "compare.json", {"names": names, "rows": rows, **meta, "config": to_dict(cfg)})
    labels = [legend_label(d, n) for d, n in zip(cfg.dirs, names, strict=True)]
    plot(out / "compare.png", names, rows, metrics, labels)
    return out


def legend_label(folder: Path, name: str) -> str:
    """``EM 2-bit``, ``E2E 1-bit``, ``E2E 1-bit, untied`` from a codebook folder's config.json;
    else its column name."""
    conf = io.read_config(folder)
    if not conf or "method" not in conf or "bits_per_channel" not in conf:
        return name
    untied = ", untied" if conf.get("tables") == "untied" else ""
    return f"{conf['method'].upper()} {round(conf['bits_per_channel'])}-bit{untied}"


def plot(
    path: Path, names: list[str], rows: list[dict], metrics: list[str], labels: list[str]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics) + 1.5, 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for n, label in zip(names, labels, strict=True):
            pts = [(r["layer"], r[n][metric]) for r in rows if n in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    fig.suptitle("Held-out key error per layer (lower is better)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
