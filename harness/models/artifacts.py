"""A cache of quantized artifacts, so a calibrated quantization (minutes on a CPU) runs once.

Calibrated quantizers (GPTQ, AWQ, SmoothQuant) save what they produce with their own library's
serializer; this module decides where and whether to rebuild. An artifact folder is keyed by a
hash of everything that determines its contents:

- the model source fingerprint (name, path, and the size + mtime of each file of a local folder:
  re-converting the embedded model invalidates its artifacts);
- the adapter and its variant parameters;
- the calibration description (corpus, samples, length, seed) plus a hash of the token ids
  actually used (a tokenizer or corpus change shows up here);
- the library versions the adapter reports, and the device it quantized on.

Folders are written atomically (a temporary folder, then one rename), so a run killed halfway
leaves no half artifact; two processes racing on one key both finish and one folder wins.
`QHARNESS_ARTIFACTS=rebuild` ignores what is cached and quantizes again (e.g. to time calibration),
replacing the cached folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.models.zoo import cache_root

CACHE_FORMAT = 1
META = "qharness-artifact.json"


def artifacts_root() -> Path:
    return cache_root() / "artifacts"


def reuse() -> bool:
    return os.environ.get("QHARNESS_ARTIFACTS", "on").lower() not in ("rebuild", "0", "off", "false", "no")


def model_fingerprint(source: Any) -> dict[str, Any]:
    """What identifies a model's weights without reading them: for a local folder, every file's
    name, size and mtime; for a hub id, the id (its revision is the hub's business)."""
    if source is None:
        return {"name": None}
    out: dict[str, Any] = {"name": source.name, "kind": source.kind, "path": source.path}
    folder = Path(source.path)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file())
        out["files"] = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return out


def calibration_fingerprint(calibration: Any) -> dict[str, Any] | None:
    if calibration is None:
        return None
    ids = calibration.input_ids.to(torch.int64).contiguous().cpu()
    return {**calibration.describe(), "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


def artifact_key(source: Any, adapter: str, variant: dict[str, Any], calibration: Any,
                 versions: dict[str, str], device: str) -> tuple[str, dict[str, Any]]:
    """(hex digest, the fields it hashes)."""
    fields = {
        "format": CACHE_FORMAT,
        "model": model_fingerprint(source),
        "adapter": adapter,
        "variant": variant,
        "calibration": calibration_fingerprint(calibration),
        "versions": versions,
        "device": device,
    }
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24], fields


def _remove_orphans(root: Path) -> None:
    """Temporary folders of builds whose process is gone (killed: SIGKILL, timeout)."""
    for tmp in root.glob(".*.tmp-*-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def cached_build(key: tuple[str, dict[str, Any]], build: Callable[[Path], dict[str, Any] | None],
                 root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The artifact folder for `key`, built by `build(tmp_folder)` on a miss.

    Returns (folder, info) where info says `artifact_cache` ("hit", "miss" or "rebuilt"), the key, and
    `quantize_s`: the wall-clock seconds of the build that produced the folder (on a hit, the
    original build's, as recorded next to the artifact). `build` may return extra metadata to
    store (e.g. the library's own timings)."""
    digest, fields = key
    root = Path(root or artifacts_root())
    final = root / digest
    if reuse() and (final / META).is_file():
        meta = json.loads((final / META).read_text())
        return final, {"artifact_cache": "hit", "artifact_key": digest, "artifact_dir": str(final),
                       "quantize_s": meta.get("quantize_s"), "built_at": meta.get("built_at"),
                       **meta.get("extra", {})}
    root.mkdir(parents=True, exist_ok=True)
    _remove_orphans(root)
    tmp = root / f".{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        extra = build(tmp) or {}
        seconds = time.perf_counter() - t0
        meta = {"key": fields, "quantize_s": seconds, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "extra": extra}
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        status = "miss"
        if final.exists() and not reuse():  # rebuild: move the old folder aside, then replace it
            status = "rebuilt"
            old = root / f".{digest}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same key first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return final, {"artifact_cache": status, "artifact_key": digest, "artifact_dir": str(final),
                       "quantize_s": seconds, **extra}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
