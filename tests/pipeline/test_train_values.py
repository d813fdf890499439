import dataclasses
import json

import pytest
import torch

from commvq.codecs.value_codec import ValueCodec
from commvq.evals.values import value_errors
from commvq.integrations.hf.loader import load_model
from commvq.integrations.hf.probe import LayerAttention, layer_inputs
from commvq.pipeline import collect, scale, train_values
from commvq.pipeline.train_values import TrainValuesConfig


@pytest.fixture
def prepared(tiny_llama, corpus_dir, tmp_path):
    lm = load_model(str(tiny_llama), device="cpu")
    key_dir = tmp_path / "data" / "key"
    collect.run(
        collect.CollectConfig(
            model=str(tiny_llama),
            dataset=str(corpus_dir),
            output_dir=key_dir,
            num_samples=256,
            max_seq_length=32,
            device="cpu",
        ),
        loaded=lm,
    )
    scale.run(scale.ScaleConfig(key_dir=tmp_path / "data" / "key"))
    return lm, tmp_path


def _cfg(tiny_llama, corpus_dir, tmp_path, **kw):
    args = dict(
        model=str(tiny_llama),
        dataset=str(corpus_dir),
        scale_file=tmp_path / "data" / "learnable_scale.pt",
        output_dir=tmp_path / "codec",
        quant_bits=2,
        max_seq_length=32,
        batch_size=2,
        steps=40,
        warmup_steps=5,
        lr=3e-3,
        save_every=20,
        device="cpu",
    )
    args.update(kw)
    return TrainValuesConfig(**args)


def test_probe_reproduces_the_models_attention(prepared):
    lm, _ = prepared
    ids = torch.randint(0, 300, (2, 16))
    hidden = layer_inputs(lm.model, ids)
    block = lm.model.model.layers[1]
    with torch.no_grad():
        pos = torch.arange(16)[None].expand(2, -1)
        pe = lm.model.model.rotary_emb(hidden[1], pos)
        want, _ = block.self_attn(
            block.input_layernorm(hidden[1]), position_embeddings=pe, attention_mask=None
        )
    probe = LayerAttention(lm.model, 1, hidden[1])
    assert torch.allclose(probe.exact, want, atol=1e-5)


def test_training_lowers_attention_error_and_resumes(prepared, tiny_llama, corpus_dir):
    lm, tmp_path = prepared
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path)
    ids = torch.randint(0, 300, (2, 32))
    torch.manual_seed(0)
    untrained = ValueCodec.from_scales(torch.load(cfg.scale_file, weights_only=True)["value"], 2)
    before = value_errors(lm.model, {"c": untrained}, [ids], [2])
    train_values.run(cfg, loaded=lm)
    trained = ValueCodec.load(cfg.output_dir, 2, 32)
    after = value_errors(lm.model, {"c": trained}, [ids], [2])
    mean = lambda rows: sum(r["c"]["attn_mse"] for r in rows) / len(rows)  # noqa: E731
    assert mean(after) < mean(before)
    conf = json.loads((cfg.output_dir / "config.json").read_text())
    assert conf["steps_done"] == 40 and len(conf["loss_history"]) == 40
    assert sum(conf["loss_history"][-5:]) < sum(conf["loss_history"][:5])
    assert set(p.name for p in cfg.output_dir.iterdir()) == {
        "config.json",
        "value_codec.safetensors",
        "trainer_state.pt",
    }
    # resume: 10 more steps continue the history
    first = conf["loss_history"]
    with pytest.raises(ValueError, match="--resume"):
        train_values.run(_cfg(tiny_llama, corpus_dir, tmp_path, steps=50), loaded=lm)
    train_values.run(_cfg(tiny_llama, corpus_dir, tmp_path, steps=50, resume=True), loaded=lm)
    conf = json.loads((cfg.output_dir / "config.json").read_text())
    assert (
        conf["steps_done"] == 50
        and conf["loss_history"][:40] == first
        and len(conf["loss_history"]) == 50
    )


def test_eval_values_rebuilds_the_training_start(prepared, tiny_llama, corpus_dir):
    from commvq.pipeline import eval_values

    lm, tmp_path = prepared
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, steps=2)
    train_values.run(cfg, loaded=lm)
    values = torch.load(cfg.scale_file, weights_only=True)["value"]
    rebuilt = eval_values._training_start(cfg.output_dir, lm, values)
    fresh = train_values.start_codec(cfg, lm, values).eval()
    assert rebuilt.layers[0].fixed_features  # width 32 leaves spare hidden units: 3-4-bit axes
    v = torch.randn(64, 32)
    for a, b in zip(rebuilt.layers, fresh.layers, strict=True):
        assert torch.equal(a.encode(v)[0], b.encode(v)[0])
    out = eval_values.run(
        eval_values.EvalValuesConfig(
            codec_dirs=[cfg.output_dir],
            model=str(tiny_llama),
            dataset=str(corpus_dir),
            max_seq_length=32,
            num_sequences=2,
            scale_file=cfg.scale_file,
            output=tmp_path / "eval",
            device="cpu",
            rounded="bfloat16",
        )
    )
    rows = json.loads((out / "values.json").read_text())["rows"]
    assert {"codec", "codec@bfloat16", "start_codec", "untrained_2bit", "kivi2"} <= set(rows[0])
    with pytest.raises(ValueError, match="--rounded int8: use bfloat16, float16"):
        eval_values.EvalValuesConfig(codec_dirs=[cfg.output_dir], rounded="int8")


def test_a_rounded_codec_holds_only_what_its_dtype_holds(prepared, tiny_llama, corpus_dir):
    from commvq.pipeline import eval_values

    lm, tmp_path = prepared
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, steps=2)
    train_values.run(cfg, loaded=lm)
    codec = ValueCodec.load(cfg.output_dir, 2, 32)
    half = eval_values.rounded(codec, torch.bfloat16)
    pairs = list(zip(codec.parameters(), half.parameters(), strict=True))
    assert pairs and all(torch.equal(b, a.bfloat16().float()) for a, b in pairs)
    assert any(
        not torch.equal(a, b) for a, b in pairs
    )  # the original is untouched, the copy rounded


def test_bad_scale_files_are_refused(prepared, tiny_llama, corpus_dir):
    lm, tmp_path = prepared
    scales = torch.load(tmp_path / "data" / "learnable_scale.pt", weights_only=True)
    scales["value"] = {0: scales["value"][0]}
    torch.save(scales, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="for 1 layers, the model has 2"):
        train_values.run(
            _cfg(tiny_llama, corpus_dir, tmp_path, scale_file=tmp_path / "short.pt"), loaded=lm
        )
    scales["value"] = {0: torch.ones(16), 1: torch.ones(16)}
    torch.save(scales, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match="16 channels"):
        train_values.run(
            _cfg(tiny_llama, corpus_dir, tmp_path, scale_file=tmp_path / "narrow.pt"), loaded=lm
        )
    with pytest.raises(FileNotFoundError, match="commvq scale"):
        train_values.run(
            _cfg(tiny_llama, corpus_dir, tmp_path, scale_file=tmp_path / "none.pt"), loaded=lm
        )


def test_nan_loss_stops_and_keeps_the_last_checkpoint(prepared, tiny_llama, corpus_dir):
    lm, tmp_path = prepared
    train_values.run(_cfg(tiny_llama, corpus_dir, tmp_path, steps=20), loaded=lm)
    good = (tmp_path / "codec" / "value_codec.safetensors").read_bytes()
    with pytest.raises(FloatingPointError, match="last checkpoint is kept"):
        train_values.run(
            _cfg(tiny_llama, corpus_dir, tmp_path, steps=40, resume=True, lr=1e30), loaded=lm
        )
    assert (tmp_path / "codec" / "value_codec.safetensors").read_bytes() == good


def test_a_pca_start_from_collected_values_runs_no_forward_pass(prepared, tiny_llama, corpus_dir):
    lm, tmp_path = prepared
    folder = tmp_path / "data" / "value"
    cfg = _cfg(tiny_llama, corpus_dir, tmp_path, init_values=folder, init_tokens=200)
    values = torch.load(cfg.scale_file, weights_only=True)["value"]
    calls = []
    real = lm.model.model.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm.model.model, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        codec = train_values.start_codec(cfg, lm, values).eval()
    assert not calls
    # the same start as one made from those vectors directly
    from commvq.data.kvstore import KVStore

    want = ValueCodec.from_scales(values, 2, cfg.seed)
    for layer, codec_layer in enumerate(want.layers):
        codec_layer.init_from_values(KVStore(folder).layer(layer).read(0, 200).float())
    v = torch.randn(64, 32)
    for a, b in zip(codec.layers, want.eval().layers, strict=True):
        assert torch.equal(a.encode(v)[0], b.encode(v)[0])
    for bad, match in ((tmp_path / "data" / "key", "keys of"), (tmp_path / "nowhere", "not a")):
        with pytest.raises(ValueError, match=f"--init_values {bad}: {match}"):
            train_values.start_codec(dataclasses.replace(cfg, init_values=bad), lm, values)


def test_codecs_trained_together_equal_those_trained_alone(prepared, tiny_llama, corpus_dir):
    lm, tmp_path = prepared
    kw = dict(steps=3, save_every=3, init_values=tmp_path / "data" / "value", init_tokens=200)
    alone = [
        _cfg(tiny_llama, corpus_dir, tmp_path, quant_bits=b, output_dir=tmp_path / f"a{b}", **kw)
        for b in (2, 1)
    ]
    together = [dataclasses.replace(c, output_dir=tmp_path / f"t{c.quant_bits}") for c in alone]
    for cfg in alone:
        train_values.run(cfg, loaded=lm)
    calls = []
    real = lm.model.model.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm.model.model, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        train_values.run_together(together, loaded=lm)
    assert len(calls) == 3  # one forward pass per step for both codecs
    for a, t in zip(alone, together, strict=True):
        sa = torch.load(a.output_dir / train_values.STATE, weights_only=True)
        st = torch.load(t.output_dir / train_values.STATE, weights_only=True)
        assert sa["history"] == st["history"] and sa["step"] == st["step"] == 3
        ca = ValueCodec.load(a.output_dir, lm.spec.num_layers, lm.spec.kv_dim)
        ct = ValueCodec.load(t.output_dir, lm.spec.num_layers, lm.spec.kv_dim)
        for pa, pt in zip(ca.state_dict().values(), ct.state_dict().values(), strict=True):
            assert torch.equal(pa, pt)
    # one resumed further than the other: they train one after the other, each to the end
    more = [dataclasses.replace(c, steps=5, save_every=1, resume=True) for c in together]
    train_values.run(dataclasses.replace(more[0], steps=4), loaded=lm)
    train_values.run_together(more, loaded=lm)
    for cfg in more:
        assert torch.load(cfg.output_dir / train_values.STATE, weights_only=True)["step"] == 5
    with pytest.raises(ValueError, match="same max_seq_length"):
        train_values.run_together([more[0], dataclasses.replace(more[1], max_seq_length=16)], lm)
