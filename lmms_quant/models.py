"""Loading VLMs: the bundled toy zoo by name, or any supported checkpoint.

``load_vlm(None)`` gives the embedded default (:data:`DEFAULT_MODEL`), which
needs no network.  Zoo names resolve to folders under ``lmms_quant/zoo/models``;
anything else goes to ``transformers`` ``from_pretrained`` (hub id or local
path), safetensors only, ``trust_remote_code`` only when asked.

Prompt formats are data (:data:`PROMPT_TEMPLATES`), used when a processor has
no chat template.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architectures import ARCHITECTURES
from .errors import ConfigurationError

__all__ = ["ZOO_DIR", "DEFAULT_MODEL", "zoo_models", "format_prompt", "resolve_pretrained", "load_vlm", "LoadedVLM", "PROMPT_TEMPLATES", "resolve_dtype",
           "parse_max_memory",
           "is_encoder_decoder", "is_bundled", "check_device", "ModelNotFoundError", "chat_template_of"]

log = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent / "zoo" / "models"
#: The trained default; until it is shipped, the built-in random model stands in.
TRAINED_DEFAULT = "toy-llava"
#: The model ``quant_vlm`` loads when ``pretrained`` is absent.
DEFAULT_MODEL = TRAINED_DEFAULT if (ZOO_DIR / TRAINED_DEFAULT / "config.json").is_file() else "tiny-random-llava"

#: family -> prompt template (``{prompt}`` is lmms-eval's context) for processors without a chat template.
PROMPT_TEMPLATES: dict[str, str] = {
    "llava": "USER: <image>\n{prompt} ASSISTANT:",
    "llava_next": "USER: <image>\n{prompt} ASSISTANT:",
    "llava_onevision": "<|im_start|>user <image>\n{prompt}<|im_end|><|im_start|>assistant\n",
    "blip2": "{prompt}",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedVLM:
    model: Any
    processor: Any
    name: str
    path: str
    family: str
    #: A checkpoint that was quantized already (our packed format, GPTQ, AWQ, compressed-tensors).
    quantization: Any = None
    #: The QuantReport dict stored in one of our own packed checkpoints.
    saved_report: dict | None = None


def chat_template_of(processor) -> str | None:
    """The processor's (or its tokenizer's) chat template, if it has one."""
    return getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)


def format_prompt(processor, family: str, text: str, n_images: int) -> str:
    """``text`` (lmms-eval's context) with ``n_images`` images in the model's prompt format:
    the processor's chat template when it has one, else :data:`PROMPT_TEMPLATES`."""
    if chat_template_of(processor):
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    fmt = PROMPT_TEMPLATES.get(family, "{prompt}")
    if "<image>" in fmt:
        fmt = fmt.replace("<image>", " ".join(["<image>"] * n_images)) if n_images else fmt.replace("<image>\n", "").replace("<image>", "")
    return fmt.format(prompt=text)


def is_encoder_decoder(model) -> bool:
    """True when the model's language model is an encoder-decoder (BLIP-2 with Flan-T5)."""
    config = getattr(model, "config", None)
    lm_config = getattr(config, "text_config", None) or config
    return bool(getattr(lm_config, "is_encoder_decoder", False))


def zoo_models() -> list[str]:
    """Names of the bundled models: trained ones shipped in the zoo, and built-in random ones."""
    from .builtin_models import BUILTIN_MODELS

    shipped = sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file()) if ZOO_DIR.is_dir() else []
    return shipped + sorted(BUILTIN_MODELS)


def _builtin_path(name: str) -> Path:
    """Build a built-in model once into the cache folder and return its path."""
    from .builtin_models import BUILTIN_MODELS
    from .cache import default_cache_dir

    path = default_cache_dir() / "builtin" / name
    if not (path / "config.json").is_file():
        import tempfile

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
        BUILTIN_MODELS[name](tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


class ModelNotFoundError(ConfigurationError, FileNotFoundError):
    """``pretrained`` names no bundled model, local folder or hub id that can be used."""


def is_bundled(pretrained: str | None) -> bool:
    """True for the default model, a shipped zoo model or a built-in random model (the toys)."""
    from .builtin_models import BUILTIN_MODELS

    name = pretrained or DEFAULT_MODEL
    return name in BUILTIN_MODELS or ("/" not in name and (ZOO_DIR / name / "config.json").is_file())


def check_device(device: str | None) -> str:
    """The device to run on: ``device`` checked against what this machine has (default: cuda if available, else cpu)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device)
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise ConfigurationError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N, mps, auto")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(f"device={text} but this machine has no CUDA device; valid here: cpu")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ConfigurationError(f"device={text} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigurationError("device=mps but MPS is not available here; valid here: cpu")
    return text


def resolve_pretrained(pretrained: str | None) -> tuple[str, str]:
    """``(name, path_or_hub_id)`` for a zoo name, a built-in name, a local folder or a hub id."""
    from .builtin_models import BUILTIN_MODELS

    name = pretrained or DEFAULT_MODEL
    if "/" not in name and (ZOO_DIR / name / "config.json").is_file():
        return name, str(ZOO_DIR / name)
    if name in BUILTIN_MODELS:
        return name, str(_builtin_path(name))
    if pretrained is None:
        raise ModelNotFoundError(f"the default model {DEFAULT_MODEL!r} is missing from {ZOO_DIR}; bundled: {zoo_models()}")
    if Path(name).is_dir():
        return Path(name).name, str(Path(name).resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(
            f"pretrained={name!r}: no such folder; give a local checkpoint folder, a hub id (org/name) or a bundled model: {zoo_models()}"
        )
    return name, name


def parse_max_memory(spec: str | dict) -> dict:
    """``"cpu:2GiB;0:20GiB"`` (devices and sizes as accelerate takes them, ``;`` or ``+`` between
    entries, since ``--model_args`` splits on commas) -> ``{"cpu": "2GiB", 0: "20GiB"}``; a dict passes."""
    if isinstance(spec, dict):
        return spec
    out: dict = {}
    for entry in re.split(r"[;+]", str(spec)):
        device, sep, size = entry.strip().rpartition(":")
        if not sep or not device or not size:
            raise ValueError(f"max_memory entry {entry!r} is not DEVICE:SIZE (e.g. cpu:2GiB;0:20GiB)")
        out[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return out


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ConfigurationError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def load_vlm(
    pretrained: str | None = None,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
) -> LoadedVLM:
    """Load a model and its processor.  The model class comes from the
    checkpoint's ``config.architectures`` and must be one the architecture table
    knows (or any class when ``trust_remote_code`` is set).

    ``device_map`` (e.g. ``auto``) with ``max_memory`` (:func:`parse_max_memory`) and
    ``offload_folder`` lets accelerate offload what does not fit to the CPU or to disk;
    :func:`lmms_quant.quantize_` then quantizes the offloaded modules block by block
    (:mod:`lmms_quant.offload`)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from .checkpoints import detect_quantization, is_packed_checkpoint, load_prequantized, load_quantized

    name, path = resolve_pretrained(pretrained)
    if Path(path).is_dir() and is_packed_checkpoint(path):  # saved by lmms_quant.checkpoints.save_quantized
        model, processor, saved = load_quantized(path, device=device, trust_remote_code=trust_remote_code)
        return LoadedVLM(model, processor, name, path, ARCHITECTURES[type(model).__name__].family,
                         quantization=detect_quantization(path), saved_report=saved)
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    detected = detect_quantization(config)
    if detected is not None:  # GPTQ / AWQ / compressed-tensors: dequantized on load, no dead packages needed
        if not Path(path).is_dir():
            raise ValueError(f"{name} is a {detected.method} checkpoint: download it to a local folder and pass that folder")
        model, processor, detected = load_prequantized(path, device=device, dtype=resolve_dtype(dtype, device),
                                                       trust_remote_code=trust_remote_code)
        return LoadedVLM(model, processor, name, path, ARCHITECTURES[type(model).__name__].family, quantization=detected)
    arch_names = list(getattr(config, "architectures", None) or [])
    cls_name = next((a for a in arch_names if a in ARCHITECTURES), None)
    if cls_name is None:
        raise ValueError(
            f"{name}: its architectures {arch_names} are not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    cls = getattr(transformers, cls_name)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"revision": revision, "dtype": torch_dtype, "use_safetensors": True,
                              "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = parse_max_memory(max_memory)
        if offload_folder:
            kwargs["offload_folder"] = str(offload_folder)
    elif max_memory or offload_folder:
        raise ValueError("max_memory and offload_folder need device_map (e.g. device_map=auto)")
    model = cls.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return LoadedVLM(model=model, processor=processor, name=name, path=path, family=ARCHITECTURES[cls_name].family)
