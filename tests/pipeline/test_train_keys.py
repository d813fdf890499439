import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from commvq import io
from commvq.data.kvstore import KVStore
from commvq.pipeline import train_keys
from commvq.pipeline.train_keys import TrainKeysConfig, parse_layers, resolve_layout
from commvq.spec import ModelSpec
from tests.pipeline.conftest import SPEC


def _cfg(key_dir, out, **kw):
    args = dict(
        key_dir=key_dir,
        output_dir=out,
        code_bits=6,
        residuals=3,
        max_iters=4,
        num_samples=256,
        device="cpu",
        chunk=100,
    )
    args.update(kw)
    return TrainKeysConfig(**args)


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("2", 4) == [2] and parse_layers("1-3", 4) == [1, 2, 3]
    assert parse_layers("3,0", 4) == [0, 3]
    for bad in ("4", "x", "2-9"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 4)


def test_layout_from_flags_and_directory_names(tmp_path):
    cfg = TrainKeysConfig()
    lay, out = resolve_layout(cfg, SPEC)
    assert (lay.code_bits, lay.residuals) == (
        12,
        1,
    ) and out.name == "codebook_12bits_8group_1residuals"
    spec128 = ModelSpec("llama", 2, 32, 8, 128, 4096, 8192, 5e5)
    assert resolve_layout(TrainKeysConfig(), spec128)[0].residuals == 21
    assert resolve_layout(TrainKeysConfig(quant_bits=1), spec128)[0].residuals == 11
    e2e = TrainKeysConfig(
        method="e2e", quant_bits=1, output_dir=tmp_path / "codebook_e2e_6bits_128group_21residuals"
    )
    lay, _ = resolve_layout(e2e, spec128)
    assert (lay.code_bits, lay.residuals, lay.e2e) == (6, 21, True)
    with pytest.raises(ValueError, match="head_dim 64"):
        resolve_layout(
            TrainKeysConfig(output_dir=tmp_path / "codebook_12bits_64group_11residuals"), spec128
        )
    with pytest.raises(ValueError, match="--residuals 5 contradicts"):
        resolve_layout(
            TrainKeysConfig(
                residuals=5, output_dir=tmp_path / "codebook_12bits_128group_21residuals"
            ),
            spec128,
        )
    with pytest.raises(ValueError, match="quant_bits 1 gives 11"):
        resolve_layout(
            TrainKeysConfig(
                quant_bits=1, output_dir=tmp_path / "codebook_12bits_128group_21residuals"
            ),
            spec128,
        )
    with pytest.raises(ValueError, match="E2E directory"):
        resolve_layout(
            TrainKeysConfig(output_dir=tmp_path / "codebook_e2e_12bits_128group_21residuals"),
            spec128,
        )
    with pytest.raises(
        ValueError, match="named for EM codebooks; use codebook_e2e_12bits_128group_21residuals"
    ):
        resolve_layout(
            TrainKeysConfig(
                method="e2e", output_dir=tmp_path / "codebook_12bits_128group_21residuals"
            ),
            spec128,
        )
    with pytest.raises(ValueError, match="code_bits 7"):
        TrainKeysConfig(code_bits=7)


def test_em_training_writes_loadable_files_and_skips_finished(key_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="commvq")  # the per-stage lines are detail (-v)
    out = tmp_path / "cb"
    train_keys.run(_cfg(key_dir, out, layers="0-1"))
    assert sorted(p.name for p in out.glob("*.pt")) == [
        "000_0.pt",
        "000_1.pt",
        "001_0.pt",
        "001_1.pt",
    ]
    conf = json.loads((out / "config.json").read_text())
    assert conf["method"] == "em" and conf["residuals"] == 3 and conf["samples"] == 256
    assert set(conf["layers"]) == {"0", "1"} and conf["layers"]["0"]["relative_mse"] < 1
    assert "stage 3/3: hard MSE (original scale)" in caplog.text
    spec = ModelSpec.from_dict(KVStore(key_dir).settings["spec"])
    cb = io.load_key_codebook(out, 1, spec)
    assert (
        cb.beam == 1 and conf["beam"] == 1
    )  # EM: the paper's greedy encoder unless --beam says otherwise
    rows = conf["layers"]["1"]["rows"]
    # both methods train on the same first rows; the error is measured on the rows after the samples
    assert rows == {"train": [0, 244], "validation": [244, 256], "eval": [256, 300]}
    keys = KVStore(key_dir).layer(1).read(*rows["eval"])
    codes, s = cb.encode(keys)
    rel = float(((cb.decode(codes, s) - keys) ** 2).sum() / (keys**2).sum())
    assert abs(rel - conf["layers"]["1"]["relative_mse"]) < 1e-5

    before = io.head_file(out, 0, 0).stat().st_mtime_ns
    io.head_file(out, 1, 1).unlink()
    train_keys.run(_cfg(key_dir, out, layers="all"))
    assert io.head_file(out, 0, 0).stat().st_mtime_ns == before  # finished files are skipped
    assert io.head_file(out, 1, 1).is_file() and io.head_file(out, 2, 0).is_file()
    train_keys.run(_cfg(key_dir, out, layers="0", overwrite=True))
    assert io.head_file(out, 0, 0).stat().st_mtime_ns != before


def test_training_is_deterministic_for_a_seed(key_dir, tmp_path):
    for name in ("a", "b"):
        train_keys.run(_cfg(key_dir, tmp_path / name, layers="2"))
    ta, _ = io.load_head(io.head_file(tmp_path / "a", 2, 1))
    tb, _ = io.load_head(io.head_file(tmp_path / "b", 2, 1))
    assert torch.equal(ta, tb)


def test_other_settings_in_directory_are_refused(key_dir, tmp_path):
    out = tmp_path / "cb"
    train_keys.run(_cfg(key_dir, out, layers="0"))
    with pytest.raises(ValueError, match="never overwrite each other"):
        train_keys.run(_cfg(key_dir, out, layers="0", residuals=2))
    train_keys.run(_cfg(key_dir, out, layers="0", residuals=2, overwrite=True))
    assert json.loads((out / "config.json").read_text())["residuals"] == 2


LOG_LINE = re.compile(
    r"^Epoch (\d+)/(\d+) - Loss: (\d+\.\d{4}), Recon: (\d+\.\d{4}), Commit: (\d+\.\d{4})$"
)


def test_e2e_writes_its_own_directory_logs_the_guide_format_and_curves(
    key_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = TrainKeysConfig(
        key_dir=key_dir,
        method="e2e",
        solver="adam",
        code_bits=6,
        residuals=2,
        epochs=3,
        batch_size=32,
        num_samples=300,
        device="cpu",
        layers="1",
        init="kmeans",
    )
    out = train_keys.run(cfg)
    assert out == Path("codebook_e2e_6bits_8group_2residuals")
    lines = capsys.readouterr().out.splitlines()
    epochs = [LOG_LINE.match(ln) for ln in lines if ln.startswith("Epoch")]
    assert len(epochs) == 3 and all(epochs)
    for m in epochs:
        loss, recon, commit = (float(m[i]) for i in (3, 4, 5))
        assert abs(loss - (recon + 0.25 * commit)) <= 2e-4
    assert any(re.fullmatch(r"✓ Saved best model with loss \d+\.\d{4}", ln) for ln in lines)
    conf = json.loads((out / "config.json").read_text())
    assert conf["method"] == "e2e" and conf["layers"]["1"]["best_epoch"] >= 0
    assert (out / "curves" / "001.png").read_bytes()[:4] == b"\x89PNG"
    # EM's default directory is another one, and neither may write into the other's
    em_out = train_keys.run(
        TrainKeysConfig(
            key_dir=key_dir,
            code_bits=6,
            residuals=2,
            max_iters=2,
            num_samples=300,
            device="cpu",
            layers="1",
        )
    )
    assert em_out == Path("codebook_6bits_8group_2residuals") and (em_out / "001_0.pt").is_file()
    with pytest.raises(ValueError, match="named for EM codebooks"):
        train_keys.run(
            TrainKeysConfig(
                key_dir=key_dir,
                method="e2e",
                output_dir=em_out,
                code_bits=6,
                residuals=2,
                solver="adam",
                epochs=1,
                device="cpu",
                layers="1",
            )
        )
    renamed = (
        tmp_path / "em_folder"
    )  # a name outside the pattern: the folder's config.json refuses it
    em_out.rename(renamed)
    with pytest.raises(ValueError, match="never overwrite each other"):
        train_keys.run(
            TrainKeysConfig(
                key_dir=key_dir,
                method="e2e",
                output_dir=renamed,
                code_bits=6,
                residuals=2,
                solver="adam",
                epochs=1,
                device="cpu",
                layers="1",
            )
        )
    with pytest.raises(ValueError, match="never overwrite each other"):
        train_keys.prepare_output(out, io.CodebookLayout(6, 8, 2), "em", False)


def test_e2e_from_em_never_ends_worse_on_heldout_and_attention_objective(key_dir, tmp_path):
    cfg = TrainKeysConfig(
        key_dir=key_dir,
        method="e2e",
        solver="adam",
        output_dir=tmp_path / "a",
        code_bits=6,
        residuals=2,
        epochs=2,
        lr=0.5,
        batch_size=32,
        num_samples=300,
        device="cpu",
        layers="0",
        init="em",
        max_iters=3,
        objective="attention",
    )
    train_keys.run(cfg)
    layer = json.loads((tmp_path / "a" / "config.json").read_text())["layers"]["0"]
    assert layer["heldout_relative_error"] <= layer["init_heldout_relative_error"]


LSTSQ_LINE = re.compile(
    r"^Round (\d+)/(\d+) - Recon: ([\d.e-]+), held-out: ([\d.e-]+) "
    r"\(step (1|0\.5|0\.25|0\.125), \d+\.\d s\)$"
)


def test_e2e_lstsq_weighted_by_prescale_picks_its_round_by_the_keys_own_error(key_dir, tmp_path):
    """``--weights prescale``: the validation error that picks the round (and is recorded) is the
    one in the keys' own scale, and the run never ends worse than its start there."""
    em_dir = tmp_path / "em"
    train_keys.run(_cfg(key_dir, em_dir, layers="0"))
    out = tmp_path / "e2e"
    train_keys.run(
        _cfg(key_dir, out, method="e2e", layers="0", init_dir=em_dir, rounds=2, weights="prescale")
    )
    layer = json.loads((out / "config.json").read_text())["layers"]["0"]
    assert layer["heldout_relative_error"] <= layer["init_heldout_relative_error"]
    val = KVStore(key_dir).layer(0).read(*layer["rows"]["validation"]).float()
    from commvq.quant import refine
    from commvq.quant.residual import normalize

    x_val, s_val = normalize(val, SPEC.num_kv_heads)
    em_thetas = io.load_layer(em_dir, 0, SPEC)
    beam = layer["beam"]
    own = refine.relative_error(x_val, em_thetas, beam, weights=s_val**2)
    assert layer["init_heldout_relative_error"] == pytest.approx(own, rel=1e-6)
    assert own != pytest.approx(refine.relative_error(x_val, em_thetas, beam), rel=1e-3)
    with pytest.raises(ValueError, match="weights"):
        _cfg(key_dir, out, method="e2e", weights="norm")


def test_e2e_lstsq_refines_em_with_a_beam_and_records_it(key_dir, tmp_path, capsys):
    em_dir = tmp_path / "em"
    train_keys.run(_cfg(key_dir, em_dir, layers="0"))
    out = tmp_path / "e2e"
    cfg = _cfg(key_dir, out, method="e2e", layers="0", init_dir=em_dir, rounds=3, beam=4)
    assert cfg.solver == "lstsq" and cfg.encode_beam == 4
    train_keys.run(cfg)
    lines = capsys.readouterr().out.splitlines()
    rounds = [LSTSQ_LINE.match(ln) for ln in lines if ln.startswith("Round")]
    assert len(rounds) == 3 and all(rounds)
    conf = json.loads((out / "config.json").read_text())
    layer = conf["layers"]["0"]
    assert (
        conf["method"] == "e2e"
        and conf["beam"] == 4
        and layer["solver"] == "lstsq"
        and layer["beam"] == 4
        and conf["train_config"]["step"] == "search"
    )
    # each round's printed step size is the one its metrics record
    assert [float(m.group(5)) for m in rounds] == [h["step_size"] for h in layer["history"]]
    assert layer["heldout_relative_error"] <= layer["init_heldout_relative_error"]
    # the start is the EM folder's codebooks: round 0 is EM under the beam on the same validation
    # rows
    em_thetas = io.load_layer(em_dir, 0, SPEC)
    val = KVStore(key_dir).layer(0).read(*layer["rows"]["validation"]).float()
    from commvq.quant import refine
    from commvq.quant.residual import normalize

    x_val = normalize(val, SPEC.num_kv_heads)[0]
    assert layer["init_heldout_relative_error"] == pytest.approx(
        refine.relative_error(x_val, em_thetas, 4)
    )
    cb = io.load_key_codebook(out, 0, SPEC)  # loaded with the beam it was trained for
    assert cb.beam == 4 and io.load_key_codebook(out, 0, SPEC, beam=1).beam == 1
    # the error in config.json is the one of the codebooks as loaded, on the rows after the samples
    keys = KVStore(key_dir).layer(0).read(*layer["rows"]["eval"])
    codes, s = cb.encode(keys)
    rel = float(((cb.decode(codes, s) - keys) ** 2).sum() / (keys**2).sum())
    assert rel == pytest.approx(layer["relative_mse"], rel=1e-5)
    assert layer["relative_mse"] <= layer["relative_mse_greedy"] + 1e-9
    # another beam width is another setting: refused in the same folder
    with pytest.raises(ValueError, match="never overwrite each other"):
        train_keys.run(
            _cfg(key_dir, out, method="e2e", layers="1", init_dir=em_dir, rounds=1, beam=2)
        )


def test_e2e_trains_untied_tables_by_default_and_files_round_trip(key_dir, tmp_path):
    """E2E (lstsq) unties EM's tables: config.json says so, each file holds ``theta [4E, P]`` (A
    rows, then B rows), the folder loads as complex thetas whose error is the one recorded, and the
    run never ends worse than EM under the same beam. EM and adam refuse untied tables, and a
    folder of one kind refuses the other."""
    em_dir = tmp_path / "em"
    train_keys.run(_cfg(key_dir, em_dir, layers="0"))
    out = tmp_path / "e2e"
    cfg = _cfg(key_dir, out, method="e2e", layers="0", init_dir=em_dir, rounds=2, beam=2)
    assert cfg.table_kind == "untied" and _cfg(key_dir, out).table_kind == "tied"
    train_keys.run(cfg)
    conf = json.loads((out / "config.json").read_text())
    layer = conf["layers"]["0"]
    assert conf["tables"] == "untied" and conf["train_config"]["tables"] is None
    assert layer["heldout_relative_error"] <= layer["init_heldout_relative_error"]
    raw = torch.load(io.head_file(out, 0, 0), weights_only=True)["steps"][0]["theta"]
    assert raw.shape == (4 * 8, SPEC.head_dim // 2) and raw.dtype == torch.float32
    thetas = io.load_layer(out, 0, SPEC)
    assert thetas.is_complex() and thetas.shape == (SPEC.num_kv_heads, 3, 16, SPEC.head_dim // 2)
    half = thetas.shape[2] // 2
    assert not torch.allclose(thetas[..., :half, :], thetas[..., half:, :])  # b moved off a
    cb = io.load_key_codebook(out, 0, SPEC)
    keys = KVStore(key_dir).layer(0).read(*layer["rows"]["eval"])
    codes, s = cb.encode(keys)
    rel = float(((cb.decode(codes, s) - keys) ** 2).sum() / (keys**2).sum())
    assert rel == pytest.approx(layer["relative_mse"], rel=1e-5)
    with pytest.raises(ValueError, match="never overwrite each other"):
        train_keys.run(
            _cfg(
                key_dir,
                out,
                method="e2e",
                layers="1",
                init_dir=em_dir,
                rounds=1,
                beam=2,
                tables="tied",
            )
        )
    with pytest.raises(ValueError, match="holds untied tables"):  # untied start, tied run
        train_keys.run(
            _cfg(key_dir, tmp_path / "t", method="e2e", layers="0", init_dir=out, tables="tied")
        )
    for kw in ({"method": "em"}, {"method": "e2e", "solver": "adam"}):
        with pytest.raises(ValueError, match="--tables untied needs --method e2e --solver lstsq"):
            _cfg(key_dir, out, tables="untied", **kw)


def test_adam_flags_without_the_adam_solver_are_named(key_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="commvq")
    train_keys.run(
        _cfg(
            key_dir,
            tmp_path / "x",
            method="e2e",
            layers="0",
            rounds=1,
            epochs=5,
            lr=0.01,
            max_iters=2,
        )
    )
    assert "--epochs, --lr set the adam solver" in caplog.text
    with pytest.raises(ValueError, match="--beam 4 needs --solver lstsq"):
        TrainKeysConfig(method="e2e", solver="adam", beam=4)


def _poison(key_dir, layer, rows, value=float("nan"), shards=1):
    """Write ``value`` into ``rows`` of one layer's first ``shards`` shards (fault injection)."""
    from safetensors.torch import load_file, save_file

    for shard in sorted((key_dir / f"L{layer:03d}").glob("*.safetensors"))[:shards]:
        data = load_file(shard)
        data["x"][rows] = value
        save_file(data, shard)


def test_nan_keys_are_dropped_and_counted_never_trained_on(key_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="commvq")
    _poison(key_dir, 0, slice(10, 20))
    _poison(key_dir, 0, slice(30, 31), float("inf"))
    for method, kw in (("em", {}), ("e2e", {"rounds": 1, "beam": 2})):
        out = tmp_path / method
        train_keys.run(_cfg(key_dir, out, method=method, layers="0", **kw))
        layer = json.loads((out / "config.json").read_text())["layers"]["0"]
        assert layer["dropped_nonfinite"] == 11 and math.isfinite(layer["relative_mse"])
        assert torch.isfinite(io.load_layer(out, 0, SPEC)).all()
    assert (
        "layer 0: dropping 11 of 256 training and validation key vectors that hold NaN or Inf"
        in caplog.text
    )
    # a layer with no finite key is refused and not marked done
    _poison(key_dir, 1, slice(None), shards=2)
    with pytest.raises(ValueError, match="layer 1 has no finite key"):
        train_keys.run(_cfg(key_dir, tmp_path / "em", layers="1"))
    assert not train_keys.layer_done(tmp_path / "em", 1, SPEC.num_kv_heads)


def test_non_finite_codebooks_are_neither_saved_nor_loaded(tmp_path):
    bad = torch.zeros(2, 16, 4)
    bad[1, 3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="not saved"):
        io.save_head(tmp_path / "000_0.pt", bad, torch.ones(2), 1.0)
    assert not (tmp_path / "000_0.pt").exists()
    torch.save(
        {"final_error": 1.0, "steps": [{"mse_loss": torch.tensor(1.0), "theta": t} for t in bad]},
        tmp_path / "000_1.pt",
    )
    with pytest.raises(ValueError, match="hold NaN or Inf; retrain its layer"):
        io.load_head(tmp_path / "000_1.pt")
    (tmp_path / "000_2.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable codebook file \\(.+\\); retrain"):
        io.load_head(tmp_path / "000_2.pt")


def test_values_are_not_keys(key_dir, tmp_path):
    from commvq.data.kvstore import KVStoreWriter

    w = KVStoreWriter(
        key_dir.parent / "value",
        "value",
        3,
        16,
        torch.float32,
        settings={"model": "toy", "spec": SPEC.to_dict()},
    )
    w.write_shard([{"x": torch.randn(10, 16)} for _ in range(3)])
    w.finish(False)
    with pytest.raises(ValueError, match="holds value vectors, not keys: give the keys folder"):
        train_keys.run(_cfg(key_dir.parent / "value", tmp_path / "cb", layers="0"))
    assert not (tmp_path / "cb").exists()


def test_attention_objective_needs_queries(key_dir, tmp_path):
    import shutil

    shutil.rmtree(key_dir.parent / "query")
    with pytest.raises(FileNotFoundError, match="--with_queries"):
        train_keys.run(
            TrainKeysConfig(
                key_dir=key_dir,
                method="e2e",
                output_dir=tmp_path / "b",
                code_bits=6,
                residuals=1,
                epochs=1,
                device="cpu",
                layers="0",
                objective="attention",
            )
        )
