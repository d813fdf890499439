"""The whole pipeline (the README's main job) on a tiny model: every stage, then the comparison."""

import dataclasses
import json
import logging
import re

import pytest

from commvq.pipeline import main_job
from commvq.pipeline.main_job import PipelineConfig


@pytest.mark.slow
def test_main_job_end_to_end_on_a_tiny_model(tiny_llama, corpus_dir, tmp_path, capsys, caplog):
    cfg = PipelineConfig(
        workdir=tmp_path / "run",
        model=str(tiny_llama),
        dataset=str(corpus_dir),
        num_samples=600,
        max_seq_length=64,
        code_bits=6,
        key_samples=300,
        em_iters=2,
        e2e_rounds=1,
        beam=2,
        value_steps=3,
        value_seq_length=32,
        ppl_tokens=200,
        lengths="230,250",
        device="cpu",
    )
    caplog.set_level(logging.INFO)
    main_job.run(cfg)
    # a log file (not a terminal) gets plain lines: each stage's start and end, no bars
    log = [r.getMessage() for r in caplog.records]
    stages = list(main_job.stage_weights([2, 1]))
    assert len(stages) == 9  # collect, scale, 2 x 2 key folders, values (both widths), 2 reports
    for i, name in enumerate(stages, 1):
        assert sum(line.startswith(f"[{i}/9] {name}: ") for line in log) == 2, name
    assert len(log) < 300 and not any("\r" in line or "\x1b" in line for line in log)
    caplog.clear()
    w = tmp_path / "run"
    _readme_inference_snippet_runs(w, str(tiny_llama), cfg)
    results = json.loads((w / "eval" / "compare.json").read_text())["results"]
    assert set(results) == {
        "fp16",
        "kivi2",
        "kivi1",
        "commvq-em2",
        "commvq-e2e2",
        "commvq-em1",
        "commvq-e2e1",
    }
    for r in results.values():
        assert (
            r["ppl"] > 1 and r["kl"] >= -1e-6 and 0 <= r["passkey"] <= 1 and 0 <= r["needle"] <= 1
        )
    assert results["fp16"]["kl"] < 1e-4
    assert (
        results["commvq-em2"]["bytes_per_token_layer"] < results["kivi2"]["bytes_per_token_layer"]
    )
    kv_dim = results["fp16"]["fp16_bytes_per_token_layer"] / 4
    for r in results.values():  # the bits columns count every stored byte, as the bytes column does
        assert (r["key_bits"] + r["value_bits"]) * kv_dim / 8 == pytest.approx(
            r["bytes_per_token_layer"]
        )
    # CommVQ-2's values: 2 bits per channel plus one fp16 factor per token
    assert results["commvq-em2"]["value_bits"] == pytest.approx(2 + 16 / kv_dim)
    assert (w / "eval" / "needle.png").read_bytes()[:4] == b"\x89PNG"
    assert (w / "compare_keys" / "compare.md").is_file()
    out = capsys.readouterr().out
    assert "| commvq-em2 |" in out and "results" in out
    # the uncompressed row ran in float32 on the CPU: it says so, with FP16's bytes beside its own;
    # each retrieval rate shows its count of probes (2 lengths x 3 depths x 1)
    assert (
        f"| fp16 (ran in float32) | 32.00 | 32.00 | {8 * kv_dim:.1f} (FP16: {4 * kv_dim:.1f}) |"
        in out
    )
    assert re.search(r"\| commvq-e2e1 \|.* \d+% \(\d/6\) \| \d+% \(\d/6\) \|", out)
    first = (w / "eval" / "compare.md").read_text()
    # a second run finds everything done, results included: not one forward pass of the model
    from transformers.models.llama import modeling_llama

    calls = []
    real = modeling_llama.LlamaModel.forward

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaModel, "forward", counted)
        main_job.run(cfg)
        assert not calls and (w / "eval" / "compare.md").read_text() == first
        # a changed retrieval setting reruns retrieval only, for every method; perplexity stays
        main_job.run(dataclasses.replace(cfg, lengths="230"))
    assert calls
    again = json.loads((w / "eval" / "compare.json").read_text())["results"]
    assert all(again[m]["ppl"] == results[m]["ppl"] for m in results)


def _readme_inference_snippet_runs(workdir, model, cfg):
    """The README's inference snippet names what the main job's defaults write, and runs on this
    job's output (its model, folder and code width swapped in)."""
    import re
    from pathlib import Path

    from commvq import io
    from commvq.quant.residual import residuals_for_bits

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Inference with a compressed cache", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    default = PipelineConfig()
    name = io.CodebookLayout(
        default.code_bits, 64, residuals_for_bits(2, 64, default.code_bits), e2e=True
    ).dir_name
    assert f"/{name}" in snippet and '"runs/embedded"' in snippet
    mine = max(  # the 2-bit folder: the most stages
        workdir.glob(f"codebook_e2e_{cfg.code_bits}bits_*"),
        key=lambda d: int(d.name.split("_")[-1].removesuffix("residuals")),
    )
    for old, new in (
        ('"embedded"', repr(model)),
        ('"runs/embedded"', repr(str(workdir))),
        (name, mine.name),
    ):
        snippet = snippet.replace(old, new)
    exec(compile(snippet, "README inference", "exec"), {})
