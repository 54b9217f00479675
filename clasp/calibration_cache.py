"""This machine's record of what load measured (kernel choices, row thresholds), so that later
loads install the same choice without measuring again.

A record is a small JSON file in $CLASP_CALIBRATION_DIR (default: the cache directory's
`calibration/`; the pods point it at a writable volume, their model cache being read-only), named by a hash of everything the
measurement depends on (CPU model and flags, torch version and threads, the kernels' source,
the model's identity and shapes, the rule): any change measures anew. CLASP_RECALIBRATE=1
measures anyway. Writes are atomic; a read-only or missing cache directory only means measuring
each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from clasp.loading import cache_dir

log = logging.getLogger(__name__)


def machine_key() -> dict:
    """What every record depends on: this CPU, this torch and its threads, the kernels' source."""
    from clasp import cpu_draft

    return {"cpu": cpu_draft.cpu_name(), "flags": cpu_draft.cpu_flags(), "torch": torch.__version__,
            "kernel": hashlib.sha256(cpu_draft.SOURCE.read_bytes()).hexdigest(), "threads": torch.get_num_threads()}


def calibration_dir() -> Path:
    return Path(os.environ.get("CLASP_CALIBRATION_DIR") or cache_dir() / "calibration")


def record_path(kind: str, key: dict) -> Path:
    """Where the record of `kind` for `key` (merged with machine_key()) is kept."""
    text = json.dumps({**machine_key(), **key}, sort_keys=True)
    return calibration_dir() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"


def recalibrating() -> bool:
    return os.environ.get("CLASP_RECALIBRATE", "") not in ("", "0")


def read(path: Path) -> dict | None:
    """The record at path, or None when absent, unreadable or CLASP_RECALIBRATE is set."""
    if recalibrating() or not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as e:
        log.warning("ignoring the calibration record %s (%s): measuring", path, e)
        return None


def write(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.info("calibration not recorded (%s)", e)
