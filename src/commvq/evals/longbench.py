"""LongBench (the 8 tasks the CommVQ paper reports) over LongBench-format JSONL in a local folder.

Each line of ``<data_dir>/<task>.jsonl`` has ``input``, ``context``, ``answers`` (list), and for
``trec`` ``all_classes``. Prompts are truncated in the middle to ``max_length`` tokens; decoding is
greedy. The prompt templates follow the structure of LongBench's (paraphrased here).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commvq.evals import metrics


@dataclass(frozen=True)
class Task:
    prompt: str
    max_new_tokens: int
    metric: str  # qa_f1, rouge, classification, code_sim
    chat: bool = True  # wrap in the chat template (few-shot and completion tasks are not wrapped)
    first_line: bool = False


TASKS: dict[str, Task] = {
    "qasper": Task(
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        'answered from the article, write "unanswerable". If it is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not explain.\n\nArticle: {context}\n\n Answer the '
        "question based on the article above as concisely as you can. If it cannot be answered, "
        'write "unanswerable"; for a yes/no question, answer "yes", "no", or "unanswerable". Do '
        "not explain.\n\nQuestion: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qmsum": Task(
        "You are given a meeting transcript and a query with a question or an instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow answer the "
        "query in one or more sentences, based on the transcript.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge",
    ),
    "multi_news": Task(
        "You are given several news passages. Write a one-page summary of all of them.\n\nNews:\n"
        "{context}\n\nNow write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge",
    ),
    "trec": Task(
        "Classify the question into one of the types below, following the examples.\n\n"
        "{context}\n{input}",
        64,
        "classification",
        chat=False,
        first_line=True,
    ),
    "triviaqa": Task(
        "Answer the question using the passage; write only the answer, as in the examples.\n\n"
        "{context}\n\n{input}",
        32,
        "qa_f1",
        chat=False,
        first_line=True,
    ),
    "samsum": Task(
        "Summarize the dialogue into a few short sentences, following the examples.\n\n"
        "{context}\n\n{input}",
        128,
        "rouge",
        chat=False,
        first_line=True,
    ),
    "lcc": Task(
        "Please complete the code given below.\n{context}Next line of code:\n",
        64,
        "code_sim",
        chat=False,
    ),
    "repobench-p": Task(
        "Please complete the code given below.\n{context}{input}Next line of code:\n",
        64,
        "code_sim",
        chat=False,
    ),
}


def load_task(data_dir: Path, task: str, limit: int | None = None) -> list[dict[str, Any]]:
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: LongBench data missing; put {task}.jsonl (LongBench format) in --data_dir"
        )
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{n}: not a JSON line ({e.msg}); fix or remove that line"
            ) from None
        bad = [k for k in ("context", "input") if k in row and not isinstance(row[k], str)]
        answers = row.get("answers") if isinstance(row, dict) else None
        if bad or not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise ValueError(
                f"{path}:{n}: a LongBench row needs text 'context'/'input' and a list of text "
                "'answers' "
                f"({'; '.join(f'{k} is {type(row[k]).__name__}' for k in bad) or 'answers'})"
            )
        rows.append(row)
    return rows[:limit] if limit else rows


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
    """Keep the first and last halves when a prompt is longer than ``max_length`` tokens."""
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[len(ids) - (max_length - half) :]


def prompt_ids(tokenizer: Any, task: str, sample: dict, max_length: int) -> list[int]:
    spec = TASKS[task]
    text = spec.prompt.format(context=sample.get("context", ""), input=sample.get("input", ""))
    ids = truncate_middle(tokenizer(text, add_special_tokens=False)["input_ids"], max_length)
    if spec.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict):
            ids = ids["input_ids"]
    return list(ids)


@torch.no_grad()
def predict(
    model: Any,
    tokenizer: Any,
    task: str,
    sample: dict,
    max_length: int,
    make_cache: Callable[[], Any] | None,
) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, task, sample, max_length)], device=model.device)
    cache = make_cache() if make_cache else None
    from commvq.integrations.hf.attention import cache_kwargs

    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=TASKS[task].max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        **cache_kwargs(model, cache),
    )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text.lstrip("\n").split("\n")[0] if TASKS[task].first_line else text


def score(
    task: str, prediction: str, answers: list[str], all_classes: list[str] | None = None
) -> float:
    metric = TASKS[task].metric
    best = 0.0
    for truth in answers:
        if metric == "qa_f1":
            value = metrics.qa_f1(prediction, truth)
        elif metric == "rouge":
            value = metrics.rouge_l(prediction, truth)
        elif metric == "classification":
            value = metrics.classification(prediction, truth, all_classes or [])
        else:
            value = metrics.code_sim(prediction, truth)
        best = max(best, value)
    return best


def task_score(task: str, rows: list[dict]) -> float:
    """Mean best-over-answers score x 100 of prediction rows (``pred``, ``answers``,
    ``all_classes``)."""
    if not rows:
        return 0.0
    return (
        100
        * sum(score(task, r["pred"], r["answers"], r.get("all_classes")) for r in rows)
        / len(rows)
    )
