"""Service flags and secrets from the environment: every flag defaults to a CLASP_* variable."""

from __future__ import annotations

import os
from pathlib import Path


def env(name: str, default=None):
    """A CLASP_<name> environment variable (every service flag defaults to one)."""
    return os.environ.get(f"CLASP_{name}", default)


def secret_from_env(name: str) -> str | None:
    """CLASP_<name>_FILE's contents (stripped), else CLASP_<name>: Secrets mount as files."""
    path = os.environ.get(f"CLASP_{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(f"CLASP_{name}") or None
