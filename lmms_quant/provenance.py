"""Versions and environment recorded beside every result."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["library_versions", "METADATA_KEY"]

#: Top-level key under which our metadata goes into lmms-eval's results JSON.
METADATA_KEY = "lmms_quant"

_PACKAGES = ("lmms-quant", "lmms-eval", "torch", "torchvision", "transformers", "accelerate", "safetensors", "pycocoevalcap", "lm-eval")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages that determine a result, plus Python and the platform."""
    out: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    try:
        import torch

        out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    return out
