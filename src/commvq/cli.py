"""`commvq <stage>`: every stage's options come from its config dataclass.

Options resolve as defaults < YAML (``--config file.yaml``) < flags. User mistakes print one
line and exit with status 2; an interrupted run exits 130 and resumes when run again. An error
is a user mistake when commvq itself raised it (its messages name the value and the fix), or when
the system refused a file (full disk, no permission, missing); anything else is a bug and keeps its
traceback, as everything does with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from commvq import __version__
from commvq.config import add_arguments, from_namespace

USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, ModuleNotFoundError, OSError)
SYSTEM_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)
PACKAGE = Path(__file__).resolve().parent


def is_user_error(e: BaseException) -> bool:
    """A user mistake (one line) rather than a bug (a traceback)."""
    if not isinstance(e, USER_ERRORS):
        return False
    if isinstance(e, OSError) and e.errno in SYSTEM_REFUSALS:
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def describe(e: BaseException) -> str:
    """The error's line: a refused file names itself, a full disk says what to do."""
    if not (isinstance(e, OSError) and e.errno in SYSTEM_REFUSALS):
        return str(e)
    where = f" ({e.filename})" if e.filename and str(e.filename) not in str(e) else ""
    hint = (
        "; free some space or write elsewhere, then run again"
        if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else ""
    )
    return f"{e}{where}{hint}"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    config: type
    run: Callable


def stages() -> list[Stage]:
    from commvq.pipeline import (
        collect,
        compare,
        eval_values,
        evaluate,
        longbench,
        main_job,
        scale,
        train_keys,
        train_values,
    )

    return [
        Stage(
            "pipeline",
            "the main job: every stage on the embedded defaults",
            main_job.PipelineConfig,
            main_job.run,
        ),
        Stage(
            "collect",
            "collect pre-RoPE keys and values (and queries) per layer",
            collect.CollectConfig,
            collect.run,
        ),
        Stage(
            "scale",
            "per-channel mean |x| of the collected keys and values",
            scale.ScaleConfig,
            scale.run,
        ),
        Stage(
            "train-keys",
            "train RoPE-commutative key codebooks (EM or E2E)",
            train_keys.TrainKeysConfig,
            train_keys.run,
        ),
        Stage(
            "train-values",
            "train the binary value codec against the frozen model",
            train_values.TrainValuesConfig,
            train_values.run,
        ),
        Stage(
            "eval-values",
            "per-layer value / attention-output error of value codecs vs KIVI",
            eval_values.EvalValuesConfig,
            eval_values.run,
        ),
        Stage(
            "eval",
            "evaluate cache methods: ppl, passkey, needle, or compare (all)",
            evaluate.EvalConfig,
            evaluate.run,
        ),
        Stage(
            "longbench-pred",
            "LongBench predictions with a compressed cache (evaluation/longbench/pred.py)",
            longbench.PredConfig,
            longbench.run_pred,
        ),
        Stage(
            "longbench-eval",
            "score LongBench predictions (evaluation/longbench/eval.py)",
            longbench.EvalConfig,
            longbench.run_eval,
        ),
        Stage(
            "compare-codebooks",
            "per-layer held-out key errors of codebook directories, side by side",
            compare.CompareConfig,
            compare.run,
        ),
    ]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Stage]]:
    parser = argparse.ArgumentParser(prog="commvq", description="CommVQ KV-cache compression.")
    parser.add_argument("--version", action="version", version=f"commvq {__version__}")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors (default: False)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="detail too, e.g. every EM stage (default: False)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="a traceback for every error (default: False)"
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    table = {}
    for st in stages():
        p = sub.add_parser(st.name, help=st.help, description=st.help)
        add_arguments(p, st.config)
        table[st.name] = st
    return parser, table


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """``-q``: every progress bar disabled for the duration of the stage, then restored."""
    from tqdm import std

    init = std.tqdm.__init__

    def silent(self, *args, **kwargs):  # a bar's own disable= is overruled too
        init(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def main(argv: Sequence[str] | None = None) -> int:
    parser, table = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font cache notice, mid-bar
    if args.verbose and not args.quiet:
        logging.getLogger("commvq").setLevel(logging.DEBUG)  # ours only, not every library's
    stage = table[args.stage]
    try:
        cfg = from_namespace(stage.config, args)
        with no_progress_bars() if args.quiet else contextlib.nullcontext():
            stage.run(cfg)
    except USER_ERRORS as e:
        if args.debug or not is_user_error(e):
            raise
        print(f"commvq {stage.name}: error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"commvq {stage.name}: interrupted; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
