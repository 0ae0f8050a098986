"""Shared loading plumbing: configs, model skeletons, safetensors files, strict state loading.

Every checkpoint reader here builds the model's *skeleton* from its config
(parameters on the meta device, buffers real), rebuilds each tensor from the
checkpoint, checks it against the skeleton's shape (a mismatch is refused
with :class:`~lmms_quant.checkpoints.qlayer.CheckpointShapeError` naming the
tensor and both shapes) and assigns it.  Nothing is loaded through pickle:
only ``*.safetensors`` files are read, and a folder that holds only pickle
weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .qlayer import CheckpointError, CheckpointShapeError

__all__ = ["read_config", "model_class", "build_skeleton", "safetensors_files", "iter_safetensors_headers",
           "load_processor", "assign_state", "legacy_renamer", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def read_config(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def model_class(config, trust_remote_code: bool = False):
    """The transformers class named by ``config.architectures``: one of the architecture table
    (as :func:`lmms_quant.models.load_vlm` requires), or any class when ``trust_remote_code``."""
    import transformers

    from ..architectures import ARCHITECTURES

    names = list(getattr(config, "architectures", None) or [])
    for n in names:
        if n in ARCHITECTURES and hasattr(transformers, n):
            return getattr(transformers, n)
    if trust_remote_code:
        for n in names:
            if hasattr(transformers, n):
                return getattr(transformers, n)
        return None  # resolved through AutoModel with remote code in build_skeleton
    raise CheckpointError(f"the checkpoint's architectures {names} are not supported; supported: {', '.join(sorted(ARCHITECTURES))}")


def build_skeleton(config, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The model with its parameters on the meta device and its buffers computed for real."""
    from accelerate import init_empty_weights

    cls = model_class(config, trust_remote_code)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        if cls is None:
            from transformers import AutoModel

            model = AutoModel.from_config(config, trust_remote_code=True, dtype=dtype)
        else:
            model = cls._from_config(config, dtype=dtype)
    return model.eval()


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (sharded or not); pickle-only folders are refused."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
        for f in files:
            if not f.is_file() or f.resolve().parent != path.resolve():
                raise CheckpointError(f"{index}: shard {f.name} is missing or outside the checkpoint folder")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{path}: only pickle weight files {pickles}; lmms-quant loads safetensors only (pickle can run code). "
                              "Convert the checkpoint to safetensors with a tool you trust.")
    raise CheckpointError(f"{path}: no *.safetensors weight file")


def iter_safetensors_headers(files: list[Path]) -> Iterator[tuple[str, Path, str, tuple[int, ...]]]:
    """``(tensor name, file, dtype string, shape)`` for every tensor, from the headers alone."""
    import struct

    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            yield name, f, info["dtype"], tuple(info["shape"])


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The processor saved beside the weights, or ``None`` when there is none."""
    path = Path(path)
    marker = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")
    if not any((path / m).is_file() for m in marker):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def legacy_renamer(model: nn.Module):
    """A function mapping a legacy checkpoint key to this transformers version's key, using the
    library's own renaming table for the model type (e.g. LLaVA's ``language_model.model.*``)."""
    rules: list[tuple[re.Pattern, str]] = []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        for conv in get_checkpoint_conversion_mapping(model.config.model_type) or []:
            if type(conv).__name__ == "WeightRenaming":
                rules.append((re.compile(conv.source_patterns[0]), conv.target_patterns[0]))
    except Exception:  # an older/newer transformers without this table: keys must already match
        rules = []

    def rename(key: str) -> str:
        for rx, repl in rules:
            new = rx.sub(repl, key, count=1)
            if new != key:
                return new
        return key

    return rename


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into a skeleton: every parameter and persistent buffer must be given with
    its exact shape, and nothing else may be given."""
    expected = model.state_dict()
    for key, t in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(t.shape):
            raise CheckpointShapeError(key, tuple(t.shape), tuple(expected[key].shape))
    missing = sorted(set(expected) - set(state))
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for key in tied:
        if key not in state and tied[key] in state:
            state[key] = state[tied[key]]
    model.load_state_dict(state, strict=True, assign=True)
    if any(p.is_meta for p in model.parameters()):
        raise CheckpointError("some parameters were not loaded: " + ", ".join(n for n, p in model.named_parameters() if p.is_meta))


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """``{tied key: source key}`` when the config ties them (e.g. ``lm_head.weight`` to the embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict):
        return {}
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    if not (getattr(cfg, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)):
        return {}
    return dict(tied)


def config_summary(config) -> dict[str, Any]:
    return {"model_type": getattr(config, "model_type", None), "architectures": list(getattr(config, "architectures", None) or [])}
