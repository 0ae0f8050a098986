"""On-disk cache of calibrated quantizations (GPTQ, AWQ).

A calibrated quantization is stored as the tensors it changed (quantized
weights, folded norms, AWQ input scales) in one safetensors file, keyed by a
hash of everything that determines it: the model's full-precision weights,
the recipe, the calibration set (its content hash) and the code version (the
package version and the source of the quantizers and the driver).  Evaluating
one configuration on several tasks therefore calibrates once.

Entries are written atomically (temporary file, then rename) with a checksum;
an entry whose checksum, metadata or tensor names do not match is reported,
deleted and recomputed, never used.  Never pickle: safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["default_cache_dir", "cache_key", "code_version", "load_entry", "save_entry"]

log = logging.getLogger(__name__)

_CODE_FILES = ("quantizers/rtn.py", "quantizers/gptq.py", "quantizers/gptq_kernels.py", "quantizers/awq.py", "calibration.py", "architectures.py", "apply.py")


def default_cache_dir() -> Path:
    """``$LMMS_QUANT_CACHE``, else ``$XDG_CACHE_HOME/lmms_quant``, else ``~/.cache/lmms_quant``."""
    if os.environ.get("LMMS_QUANT_CACHE"):
        return Path(os.environ["LMMS_QUANT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmms_quant"


def code_version() -> str:
    from ._version import __version__

    h = hashlib.sha256(__version__.encode())
    root = Path(__file__).resolve().parent
    for rel in _CODE_FILES:
        h.update((root / rel).read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


def cache_key(model_fingerprint: str, recipe: dict[str, Any], calibration: dict[str, Any]) -> str:
    payload = {"model": model_fingerprint, "recipe": recipe, "calibration": calibration, "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_entry(cache_dir: Path, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write an entry atomically; returns its folder."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=cache_dir))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        meta = {"key": key, "tensors_sha256": _sha256_file(tmp / "tensors.safetensors"), "names": sorted(tensors), "info": info}
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_entry(cache_dir: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The cached tensors and calibration record, or ``None`` (missing, or corrupt and removed)."""
    folder = cache_dir / key
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("key") != key or _sha256_file(folder / "tensors.safetensors") != meta["tensors_sha256"]:
            raise ValueError("checksum or key mismatch")
        tensors = load_file(str(folder / "tensors.safetensors"))
        if sorted(tensors) != meta["names"]:
            raise ValueError("tensor names differ from the metadata")
        return tensors, meta["info"]
    except Exception as exc:  # any damage: recompute, never use
        log.warning("calibration cache entry %s is corrupt or partial (%s); recomputing", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
