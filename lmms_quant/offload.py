"""Quantizing a model that accelerate has offloaded (``device_map=auto`` with ``max_memory``), block by block.

A module that accelerate offloaded to the CPU or to disk keeps its weights on the ``meta`` device; its
``AlignDevicesHook`` loads them from a ``weights_map`` for each forward call and drops them after.  To
quantize such a module, :func:`materialized` loads every offloaded tensor under it onto its execution
device and switches the hooks' offloading off, so that forward calls inside (calibration, AWQ's search)
use and keep the tensors as they are being changed; on exit every tensor is written back to its weights
map (a RAM state dict, or a new memory-mapped file in the offload folder for disk offload) and put back
on ``meta``.  :func:`tensor_of` and :func:`assign` read and write one named tensor the same way, for
the hash, the checks and the cache.  A model without offloaded modules passes through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["is_offloaded", "materialized", "tensor_of", "assign"]


def _offload_hook(module: nn.Module) -> Any | None:
    """The module's accelerate hook that offloads its tensors, if any (also inside a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def _owned(module: nn.Module, hook: Any) -> list[str]:
    """Names (relative to ``module``) of the tensors ``hook`` loads and offloads."""
    from accelerate.utils import named_module_tensors

    return [n for n, _ in named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                               remove_non_persistent=True)]


def is_offloaded(model: nn.Module) -> bool:
    return any(_offload_hook(m) is not None for m in model.modules())


def _write_back(weights_map: Any, name: str, value: torch.Tensor) -> None:
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    loader, key = (weights_map.dataset, weights_map.prefix + name) if isinstance(weights_map, PrefixedDataset) else (weights_map, name)
    value = value.detach().to("cpu", copy=True)
    if isinstance(loader, OffloadedWeightsLoader):
        if key in loader.state_dict or loader.save_folder is None:
            loader.state_dict[key] = value  # offloaded to RAM
        else:  # offloaded to disk: a new memory-mapped file in the offload folder (the checkpoint is never written)
            offload_weight(value, key, loader.save_folder, index=loader.index)
    elif isinstance(loader, dict):
        loader[key] = value
    else:
        raise TypeError(f"cannot write {key} back into an offload map of type {type(loader).__name__}")


@contextlib.contextmanager
def materialized(root: nn.Module) -> Iterator[nn.Module]:
    """Every offloaded tensor under ``root`` in memory on its execution device, written back on exit."""
    from accelerate.utils import set_module_tensor_to_device

    owners = [(m, h) for m in root.modules() if (h := _offload_hook(m)) is not None]
    loaded: list[tuple[nn.Module, Any]] = []
    try:
        for module, hook in owners:
            for name in _owned(module, hook):
                set_module_tensor_to_device(module, name, hook.execution_device, value=hook.weights_map[name])
            hook.offload = False
            loaded.append((module, hook))
        yield root
    finally:
        for module, hook in loaded:
            for name in _owned(module, hook):  # again: a buffer added inside (AWQ's input scale) goes to the map too
                _write_back(hook.weights_map, name, getattr(*_split(module, name)))
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True


def _split(model: nn.Module, full_name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = full_name.rpartition(".")
    return model.get_submodule(owner) if owner else model, leaf


def tensor_of(model: nn.Module, full_name: str) -> torch.Tensor:
    """The named parameter or buffer's values, read from its offload map when it is offloaded."""
    module, leaf = _split(model, full_name)
    t = getattr(module, leaf)
    hook = _offload_hook(module)
    if t is not None and t.is_meta and hook is not None:
        return hook.weights_map[leaf]
    return t


def assign(model: nn.Module, full_name: str, value: torch.Tensor) -> None:
    """Set the named parameter or buffer to ``value`` (in its dtype), through its offload map when offloaded."""
    module, leaf = _split(model, full_name)
    t = getattr(module, leaf)
    hook = _offload_hook(module)
    if t.is_meta and hook is not None:
        _write_back(hook.weights_map, leaf, value.to(t.dtype))
    else:
        with torch.no_grad():
            t.data.copy_(value.to(t.dtype))
