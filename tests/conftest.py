"""Shared fixtures: tiny random models built in memory, a tiny corpus; nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import TEXTS, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``{arch: folder}`` of saved tiny random Llama / Mistral / Qwen2 models with a tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, text in enumerate(TEXTS):
        (d / f"doc{i:02d}.txt").write_text(text)
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
