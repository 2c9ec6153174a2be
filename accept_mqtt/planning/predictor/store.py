"""Saving and loading predictor state, and reading timing-sample files.

Guarantees:

* A state file is one JSON header line (format name, format version, River and Python
  versions, SHA-256 and length of the payload) followed by a pickle payload. ``save_state``
  writes a temporary file in the same directory, fsyncs it and renames it over the target, so
  a crash never leaves a torn file where a good one was.
* ``load_state`` raises ``PredictorStateError`` -- never anything else -- for a missing,
  truncated, corrupt, foreign or incompatible file, with the path and the reason in the
  message, so a caller can fall back to a seeded model instead of crash-looping.
* Pickle runs code from the file: load only state files this project wrote (the checksum
  catches corruption, not tampering).
* ``read_samples`` reads JSON lines, gzip-compressed when the name ends in ``.gz``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import river

FORMAT = "accept-mqtt-predictor"
FORMAT_VERSION = 1
SEED_SAMPLES = Path(__file__).with_name("data") / "seed_samples.jsonl.gz"


class PredictorStateError(Exception):
    """A predictor state file that cannot be used (missing, corrupt or incompatible)."""


def save_state(obj: Any, path: str | Path, kind: str) -> None:
    """Pickle ``obj`` to ``path`` atomically under a versioned header naming its ``kind``."""
    path = Path(path)
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": kind,
        "river": river.__version__, "python": platform.python_version(),
        "sha256": hashlib.sha256(payload).hexdigest(), "length": len(payload),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a state file (``PredictorStateError`` if it has none)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PredictorStateError(f"cannot read predictor state {path}: {e.strerror}") from e
    line, sep, payload = data.partition(b"\n")
    try:
        header = json.loads(line) if sep else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PredictorStateError(f"{path} is not an accept-mqtt predictor state file")
    return header, payload


def load_state(path: str | Path, kind: str) -> Any:
    """Unpickle the state of ``kind`` saved by ``save_state``; see the module guarantees."""
    path = Path(path)
    header, payload = _read(path)
    if header.get("version") != FORMAT_VERSION:
        raise PredictorStateError(
            f"{path} has predictor state format v{header.get('version')}, this version reads "
            f"v{FORMAT_VERSION}; delete it (a fresh model is seeded) or re-run with the "
            f"version that wrote it")
    if header.get("kind") != kind:
        raise PredictorStateError(f"{path} holds a {header.get('kind')!r}, not a {kind!r}")
    if len(payload) != header.get("length") or \
            hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise PredictorStateError(f"{path} is truncated or corrupt (checksum mismatch)")
    try:
        return pickle.loads(payload)
    except Exception as e:  # a pickle from another River/Python version can fail anywhere
        raise PredictorStateError(
            f"{path} was written with River {header.get('river')} / Python "
            f"{header.get('python')} and cannot be loaded here (River {river.__version__}, "
            f"Python {platform.python_version()}): {type(e).__name__}: {e}") from e


def read_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Timing samples from a JSON-lines file (``.gz``: gzip-compressed); blank lines skipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON: {e}") from e
