"""Is the Hugging Face hub reachable? Used only to resolve ``auto`` defaults."""

from __future__ import annotations

import functools
import os
import socket

HUB_HOST = "huggingface.co"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_by_env() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in OFFLINE_VARS
    )


def hub_reachable() -> bool:
    """False when an offline variable is set or ``huggingface.co:443`` does not answer."""
    return not offline_by_env() and _probe()


@functools.lru_cache(maxsize=1)
def _probe(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False
