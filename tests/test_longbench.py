"""LongBench: metrics on known cases, and pred.py -> eval.py on a tiny LongBench-format fixture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commvq.evals import longbench as lb
from commvq.evals import metrics

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_on_known_cases():
    assert metrics.qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert metrics.qa_f1("a red car", "blue car") == pytest.approx(0.5)
    assert metrics.qa_f1("nothing", "else") == 0.0
    assert metrics.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert metrics.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(
        2 * 1 * 0.5 / 1.5
    )
    classes = ["Location", "Number", "Human being", "Description"]
    assert metrics.classification("Type: Location", "Location", classes) == 1.0
    assert metrics.classification("Location or Number", "Number", classes) == 0.5
    assert metrics.classification("Human being", "Description", classes) == 0.0
    assert metrics.code_sim("# comment\nreturn x + 1\n", "return x + 1") == 1.0
    assert 0 < metrics.code_sim("return y", "return x + 1") < 1


def test_truncate_middle_and_task_table():
    ids = list(range(10))
    assert lb.truncate_middle(ids, 4) == [0, 1, 8, 9] and lb.truncate_middle(ids, 20) == ids
    assert set(lb.TASKS) == {
        "qasper",
        "qmsum",
        "multi_news",
        "trec",
        "triviaqa",
        "samsum",
        "lcc",
        "repobench-p",
    }
    assert {t.metric for t in lb.TASKS.values()} == {"qa_f1", "rouge", "classification", "code_sim"}
    assert lb.TASKS["triviaqa"].max_new_tokens == 32 and lb.TASKS["qmsum"].max_new_tokens == 512


def _fixture(folder: Path):
    folder.mkdir()
    ctx = "The union is strong. The budget is balanced. Trade grows with peace. " * 6
    rows = {
        "qasper": {"input": "Is the union strong?", "answers": ["yes"]},
        "qmsum": {"input": "Summarize.", "answers": ["The union is strong."]},
        "multi_news": {"input": "", "answers": ["Trade grows."]},
        "trec": {
            "input": "Question: Who wrote it?\nType:",
            "answers": ["Human being"],
            "all_classes": ["Human being", "Location", "Number"],
        },
        "triviaqa": {"input": "Question: what grows?\nAnswer:", "answers": ["trade"]},
        "samsum": {"input": "Dialogue: A: hi\nB: hello\nSummary:", "answers": ["A and B greet."]},
        "lcc": {"input": "", "answers": ["return x"]},
        "repobench-p": {"input": "def f(x):\n", "answers": ["    return x"]},
    }
    for task, row in rows.items():
        lines = [json.dumps({"context": ctx, "length": 80, **row}) for _ in range(2)]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")


def test_pred_then_eval_scripts_on_a_tiny_fixture(tiny_llama, tmp_path):
    _fixture(tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for method in ("fp16", "kivi2"):
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "evaluation" / "longbench" / "pred.py"),
                "--model",
                str(tiny_llama),
                "--method",
                method,
                "--max_length",
                "64",
                "--window",
                "32",
                "--tasks",
                "all",
                "--limit",
                "1",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluation" / "longbench" / "eval.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert set(results) == {"llama-fp16", "llama-kivi2"}
    for scores in results.values():
        assert set(scores) == set(lb.TASKS) | {"average"}
        assert all(0 <= v <= 100 for v in scores.values())
    preds = (tmp_path / "pred" / "llama-fp16" / "trec.jsonl").read_text().splitlines()
    assert len(preds) == 1 and "\n" not in json.loads(preds[0])["pred"]


def test_pred_resumes_over_a_torn_last_line(tiny_llama, tmp_path):
    from commvq.pipeline.longbench import PredConfig, run_pred

    _fixture(tmp_path / "data")
    cfg = dict(
        model=str(tiny_llama),
        method="fp16",
        max_length=64,
        window=32,
        tasks="trec",
        data_dir=tmp_path / "data",
        out_dir=tmp_path / "pred",
        device="cpu",
    )
    out = run_pred(PredConfig(**cfg, limit=1))
    path = out / "trec.jsonl"
    first = path.read_text()
    with path.open("a") as fh:  # an interrupted second write: half a line
        fh.write(first[: len(first) // 2])
    run_pred(PredConfig(**cfg, limit=2))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first.rstrip("\n")
    assert all(json.loads(ln)["answers"] == ["Human being"] for ln in lines)  # every line whole


def test_bad_task_rows_name_the_file_and_line(tmp_path):
    good = json.dumps({"context": "c", "input": "i", "answers": ["a"]})
    for bad, match in (
        (good + "\n{torn", ":2: not a JSON line"),
        (good + "\n" + json.dumps({"context": 5, "answers": ["a"]}), ":2: .*context is int"),
        ("\n" + json.dumps({"context": "c"}), ":2: .*answers"),
    ):
        (tmp_path / "trec.jsonl").write_text(bad + "\n")
        with pytest.raises(ValueError, match=match):
            lb.load_task(tmp_path, "trec")
    (tmp_path / "trec.jsonl").write_text(good + "\n\n" + good + "\n")
    assert len(lb.load_task(tmp_path, "trec")) == 2


def test_complete_lines_cuts_only_a_torn_tail(tmp_path):
    from commvq.fsutil import complete_lines

    p = tmp_path / "x.jsonl"
    assert complete_lines(p) == 0
    p.write_text('{"a": 1}\n{"a": 2}\n')
    assert complete_lines(p) == 2 and p.read_text() == '{"a": 1}\n{"a": 2}\n'
    p.write_text('{"a": 1}\n{"a"')
    assert complete_lines(p) == 1 and p.read_text() == '{"a": 1}\n'


def test_codebooks_in_the_model_folder_are_found(tmp_path):
    from commvq.pipeline.longbench import PredConfig, resolve_method

    model = tmp_path / "Llama-3.1-8B-Instruct"
    (model / "Llama-3.1-8B-Instruct-CommVQ-2bit-codebook").mkdir(parents=True)
    m = resolve_method(PredConfig(model=str(model)))
    assert m.name == "commvq" and m.key_dir.name.endswith("CommVQ-2bit-codebook")
    assert resolve_method(PredConfig(model=str(tmp_path))).name == "fp16"
    with pytest.raises(FileNotFoundError, match="CommVQ"):
        resolve_method(PredConfig(model=str(tmp_path), method="commvq"))
    with pytest.raises(ValueError, match="unknown"):
        PredConfig(tasks="qasper,nope")
