"""lmms-eval's own backends as quant_vlm's serving layer, so quant_vlm's predictions are theirs.

For a family that lmms-eval 0.7.3 serves with a backend of its own (:data:`LMMS_EVAL_BACKENDS`),
quant_vlm loads and quantizes the model, then builds that backend around the quantized model and
hands it every request: prompt format, chat template, image preprocessing (Qwen2.5-VL's JPEG data
URLs and pixel limits included), generation settings and decoding are lmms-eval's, so a
16-bit quant_vlm run gives exactly the predictions of ``--model llava_hf`` (or ``qwen2_vl``,
``qwen2_5_vl``) and a quantized run differs from it only by the quantization.

The backend's constructor loads its model with ``<ModelClass>.from_pretrained``; while it runs,
that one call returns the already quantized model instead (:func:`build_backend`), so the weights
are loaded once.  Families without such a backend (BLIP-2, Idefics3/SmolVLM: lmms-eval's
``idefics2`` loads Idefics2 only; LLaVA-OneVision's own backend needs the LLaVA-NeXT repository,
so ``llava_hf``, which serves it too, is used) are served by quant_vlm itself.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import transformers

__all__ = ["BackendRef", "LMMS_EVAL_BACKENDS", "build_backend", "backend_for"]


@dataclass(frozen=True)
class BackendRef:
    """An lmms-eval backend: its ``--model`` name, class, the transformers class it loads, and how it takes a device."""

    name: str
    class_path: str
    model_class: str
    #: the constructor keys that set device and dtype (``None``: the backend has no such key)
    device_map_key: str | None = "device_map"
    dtype_key: str | None = None
    #: what the backend does not serve (a request type -> the reason)
    lacks: tuple[tuple[str, str], ...] = ()
    #: the largest batch its generate_until takes (llava_hf asserts batch size 1)
    max_batch_size: int | None = None


_LLAVA_HF = dict(name="llava_hf", class_path="lmms_eval.models.simple.llava_hf.LlavaHf", dtype_key="dtype", max_batch_size=1)
_QWEN_LACKS = (("loglikelihood", "lmms-eval's qwen2_vl / qwen2_5_vl backends raise NotImplementedError for loglikelihood"),)

#: family -> the lmms-eval backend that serves it.
LMMS_EVAL_BACKENDS: dict[str, BackendRef] = {
    "llava": BackendRef(model_class="LlavaForConditionalGeneration", **_LLAVA_HF),
    "llava_next": BackendRef(model_class="LlavaNextForConditionalGeneration", **_LLAVA_HF),
    "llava_onevision": BackendRef(model_class="LlavaOnevisionForConditionalGeneration", **_LLAVA_HF),
    "qwen2_vl": BackendRef("qwen2_vl", "lmms_eval.models.simple.qwen2_vl.Qwen2_VL", "Qwen2VLForConditionalGeneration",
                           lacks=_QWEN_LACKS),
    "qwen2_5_vl": BackendRef("qwen2_5_vl", "lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL", "Qwen2_5_VLForConditionalGeneration",
                             lacks=_QWEN_LACKS),
}


def backend_for(family: str) -> BackendRef | None:
    return LMMS_EVAL_BACKENDS.get(family)


@contextlib.contextmanager
def _serving(model_class: type, model: Any) -> Iterator[None]:
    """While active, ``model_class.from_pretrained(...)`` returns ``model`` (whatever it is asked)."""
    original = model_class.__dict__["from_pretrained"] if "from_pretrained" in model_class.__dict__ else None
    model_class.from_pretrained = classmethod(lambda cls, *args, **kwargs: model)
    try:
        yield
    finally:
        if original is None:
            del model_class.from_pretrained
        else:
            model_class.from_pretrained = original


def build_backend(ref: BackendRef, model: Any, path: str, *, device: str, batch_size: int, dtype: Any = None):
    """The lmms-eval backend ``ref`` serving ``model`` (already loaded and quantized) with the processor at ``path``."""
    module_name, cls_name = ref.class_path.rsplit(".", 1)
    backend_cls = getattr(importlib.import_module(module_name), cls_name)
    kwargs: dict[str, Any] = {"pretrained": path, "device": device, "batch_size": min(batch_size, ref.max_batch_size or batch_size)}
    if ref.device_map_key:
        kwargs[ref.device_map_key] = device
    if ref.dtype_key and dtype is not None:
        kwargs[ref.dtype_key] = dtype
    model_class = getattr(transformers, ref.model_class)
    if type(model) is not model_class:
        raise TypeError(f"{ref.name} serves {ref.model_class}, not {type(model).__name__}")
    with _serving(model_class, model):
        return backend_cls(**kwargs)
