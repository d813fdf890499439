"""What every benchmark records beside its figures."""

from __future__ import annotations

import os
import subprocess


def commit_id() -> str:
    """The commit measured: ``COMMVQ_COMMIT`` when set (a copied working tree may carry a stale
    ``.git``), else ``git rev-parse --short HEAD``."""
    if os.environ.get("COMMVQ_COMMIT"):
        return os.environ["COMMVQ_COMMIT"]
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
