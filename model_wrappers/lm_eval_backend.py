"""``quant_llm``: an lm-eval (lm-evaluation-harness) backend for the language model of a quantized VLM.

    lmms-quant lm-eval --model quant_llm \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,bits_llm=3,bits_vit=4,method=rtn --tasks wikitext,lq_text_ppl

The whole VLM is loaded with :func:`lmms_quant.models.load_vlm` and quantized
with :func:`lmms_quant.quantize_` exactly as ``quant_vlm`` does on the
lmms-eval side (the same recipe keys give the same weights: compare
``weights_sha256``).  Its language model is then served to lm-eval through
lm-eval's own :class:`~lm_eval.models.huggingface.HFLM`, so loglikelihood,
loglikelihood_rolling and generate_until follow lm-eval's conventions
(summed log-probabilities, higher is better; batched; rolling windows) --
not lmms-eval's mean negative log-likelihood.

Which module serves text (:func:`language_model_of`):

* a model whose ``language_model`` is a complete LM with its own output head
  (BLIP-2's OPT or Flan-T5) -> that module;
* otherwise the model itself, called with ``input_ids`` only (LLaVA, LLaVA-NeXT,
  LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM): with no pixel
  values these run exactly decoder + ``lm_head``, on the quantized weights;
* a plain causal LM (a folder or a GGUF file that ``AutoModelForCausalLM``
  loads, e.g. SmolLM2) -> itself; ``bits_llm`` then applies to its decoder
  layers (rows of :data:`lmms_quant.architectures.LANGUAGE_MODELS`).

The run's metadata (the QuantReport, versions, seed, model, timings) is
returned by :meth:`QuantLLM.get_model_info` under the key ``lmms_quant``; lm-eval
puts that into ``results["config"]``, and :mod:`.lm_eval_plugin` moves it to a
top-level ``lmms_quant`` key of the results JSON.

lm-eval 0.4.13 discovers no models from installed packages (no entry points),
so ``--model quant_llm`` works through ``lmms-quant lm-eval`` (which imports
:mod:`.lm_eval_plugin` first) or after importing this module in Python.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from lmms_quant.apply import quantize_
from lmms_quant.architectures import ARCHITECTURES
from lmms_quant.cache import default_cache_dir
from lmms_quant.calibration_data import build_calibration_set, prepare_calibration
from lmms_quant.errors import ConfigurationError as LmmsQuantConfigurationError
from lmms_quant.models import is_encoder_decoder, load_vlm, resolve_dtype, resolve_pretrained
from lmms_quant.provenance import METADATA_KEY, library_versions
from lmms_quant.recipe import RECIPE_ARG_KEYS, RecipeError, recipe_from_args

from .exits import exit_on_error

__all__ = ["MODEL_NAME", "QuantLLM", "ConfigurationError", "LoadedLM", "language_model_of", "load_language_model"]

log = logging.getLogger(__name__)

#: The name ``--model`` takes.
MODEL_NAME = "quant_llm"
#: model_args that say what to load and how.
BACKEND_ARG_KEYS = ("pretrained", "gguf_file", "tokenizer", "revision", "device", "dtype", "trust_remote_code",
                    "attn_implementation", "verify", "cache", "cache_dir")
#: model_args passed through to lm-eval's HFLM unchanged.
HFLM_ARG_KEYS = ("batch_size", "max_batch_size", "max_length", "add_bos_token", "prefix_token_id", "truncation",
                 "logits_cache", "softmax_dtype")


class ConfigurationError(LmmsQuantConfigurationError):
    """Bad ``--model_args``; raised before anything is loaded where possible.

    Through the backend, it ends the process with exit status 2 and one line (:mod:`.exits`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"invalid --model_args for {MODEL_NAME}: {message}")
        self.message = message


@dataclass
class LoadedLM:
    """``model`` is what the recipe quantizes (the whole VLM, or the causal LM);
    ``lm`` is the module that serves text (a view that shares ``model``'s weights).
    ``processor`` and ``family`` (VLMs loaded from a checkpoint only) build GPTQ/AWQ
    calibration sets exactly as ``quant_vlm`` does."""

    model: nn.Module
    lm: transformers.PreTrainedModel
    tokenizer: Any
    name: str
    path: str
    kind: str  # "vlm" or "llm"
    processor: Any = None
    family: str | None = None


def language_model_of(model: nn.Module) -> transformers.PreTrainedModel:
    """The module of ``model`` that maps ``input_ids`` to next-token logits.

    ``model.language_model`` when it is a complete LM with its own output
    embeddings that can generate (BLIP-2); else ``model`` itself when it has an
    output head and can generate (LLaVA-style VLMs, plain causal LMs).  Raises
    ``ValueError`` for models with no language-model head (CLIP, SigLIP,
    BLIP-2 ITM).
    """
    for candidate in (getattr(model, "language_model", None), model):
        if (isinstance(candidate, transformers.PreTrainedModel) and candidate.get_output_embeddings() is not None
                and candidate.can_generate()):
            return candidate
    raise ValueError(f"{type(model).__name__} has no language-model head (no output embeddings that can generate); "
                     f"{MODEL_NAME} needs a VLM with a language model or a causal LM")


def _split_gguf(pretrained: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``pretrained=/x/model.gguf`` is short for ``pretrained=/x,gguf_file=model.gguf``."""
    p = Path(pretrained)
    if gguf_file is None and p.suffix == ".gguf" and p.is_file():
        return str(p.parent), p.name
    return pretrained, gguf_file


def _is_vlm(config: transformers.PretrainedConfig) -> bool:
    return any(a in ARCHITECTURES for a in (getattr(config, "architectures", None) or []))


def load_language_model(
    pretrained: str | nn.Module | None = None,
    *,
    gguf_file: str | None = None,
    tokenizer: str | Any | None = None,
    revision: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> LoadedLM:
    """Load a VLM (through :func:`load_vlm`, the loader ``quant_vlm`` uses) or a plain causal LM.

    ``pretrained``: a bundled model name, a folder, a hub id, a ``.gguf`` file,
    or an already-built ``nn.Module`` (then ``tokenizer`` is required: an
    instance or a path).  A checkpoint whose ``config.architectures`` names a
    class of the architecture table is a VLM; anything else goes to
    ``AutoModelForCausalLM`` (safetensors only, except GGUF).
    """
    if isinstance(pretrained, nn.Module):
        if tokenizer is None:
            raise ValueError("pretrained is a model instance: pass its tokenizer too (tokenizer=...)")
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        kind = "vlm" if type(pretrained).__name__ in ARCHITECTURES else "llm"
        return LoadedLM(pretrained, language_model_of(pretrained), tok, type(pretrained).__name__,
                        str(getattr(pretrained, "name_or_path", "") or ""), kind)

    if pretrained is not None:
        pretrained, gguf_file = _split_gguf(str(pretrained), gguf_file)
    name, path = resolve_pretrained(pretrained)
    config = transformers.AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    if _is_vlm(config):
        if gguf_file:
            raise ValueError(f"{name}: GGUF files hold language models only; load a VLM from its folder or hub id")
        loaded = load_vlm(pretrained, revision=revision, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation)
        tok = tokenizer if tokenizer is not None else getattr(loaded.processor, "tokenizer", loaded.processor)
        if isinstance(tok, str):
            tok = transformers.AutoTokenizer.from_pretrained(tok, revision=revision, trust_remote_code=trust_remote_code)
        return LoadedLM(loaded.model, language_model_of(loaded.model), tok, loaded.name, loaded.path, "vlm",
                        processor=loaded.processor, family=loaded.family)

    kwargs: dict[str, Any] = {"revision": revision, "dtype": resolve_dtype(dtype, device), "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    if tokenizer is None or isinstance(tokenizer, str):
        tok_kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        if tokenizer is None and gguf_file:
            tok_kwargs["gguf_file"] = gguf_file
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer or path, **tok_kwargs)
    else:
        tok = tokenizer
    label = f"{name}/{gguf_file}" if gguf_file else name
    return LoadedLM(model, language_model_of(model), tok, label, path, "llm")


def _resolve_device(device: str | None) -> str:
    """The device to load on.  lm-eval's CLI passes ``cuda:0`` unless told otherwise; like its ``hf``
    backend, we then run on the CPU when there is no GPU (with a warning) instead of failing."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("%s: device=%s requested but CUDA is not available; using the CPU", MODEL_NAME, device)
        return "cpu"
    return str(device)


def _calibration_set(loaded: LoadedLM, recipe, rows=None):
    """The calibration set ``quant_vlm`` builds for the same recipe (same records, prompts and processor)."""
    return build_calibration_set(loaded.processor, loaded.family, rows or recipe.calibration, loaded.lm.device, loaded.lm.dtype,
                                 encoder_decoder=is_encoder_decoder(loaded.model))


@register_model(MODEL_NAME)
class QuantLLM(HFLM):
    """lm-eval backend: the language model of a per-component quantized VLM (or a quantized causal LM).

    ``model_args``: the recipe keys of ``quant_vlm`` (``bits_llm``, ``bits_vit``,
    ``method``, ``group_size_llm``, ``blocks_llm``, ``recipe=FILE``, ``seed``...,
    see :data:`lmms_quant.recipe.RECIPE_ARG_KEYS`), the loading keys
    :data:`BACKEND_ARG_KEYS` and lm-eval's :data:`HFLM_ARG_KEYS`.  Unknown keys
    and bad values raise :class:`ConfigurationError` before anything loads.
    """

    def __init__(self, pretrained: str | nn.Module | None = None, **kwargs: Any) -> None:
        with exit_on_error("model load"):
            self._setup(pretrained, **kwargs)

    def loglikelihood(self, requests, *args, **kwargs):
        with exit_on_error("evaluation (loglikelihood)"):
            return super().loglikelihood(requests, *args, **kwargs)

    def loglikelihood_rolling(self, requests, *args, **kwargs):
        with exit_on_error("evaluation (loglikelihood_rolling)"):
            return super().loglikelihood_rolling(requests, *args, **kwargs)

    def generate_until(self, requests, *args, **kwargs):
        with exit_on_error("evaluation (generate_until)"):
            return super().generate_until(requests, *args, **kwargs)

    def _setup(self, pretrained: str | nn.Module | None = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(BACKEND_ARG_KEYS) - set(HFLM_ARG_KEYS) - set(RECIPE_ARG_KEYS))
        if unknown:
            raise ConfigurationError(
                f"unknown key(s) {unknown}; valid loading keys: {', '.join(BACKEND_ARG_KEYS)}; "
                f"lm-eval keys: {', '.join(HFLM_ARG_KEYS)}; recipe keys: {', '.join(RECIPE_ARG_KEYS)}"
            )
        try:
            recipe = recipe_from_args({k: v for k, v in kwargs.items() if k in RECIPE_ARG_KEYS})
        except RecipeError as exc:
            raise ConfigurationError(str(exc)) from None
        if recipe.needs_calibration and recipe.calibration.source == "task":
            raise ConfigurationError("calib_source=task calibrates on an lmms-eval task's images and prompts; "
                                     "with quant_llm use calib_source=world, text, a JSONL file or a datasets source")
        try:
            resolve_dtype(kwargs.get("dtype", "auto"), "cpu")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        calib_rows = None
        if isinstance(pretrained, (str, type(None))):  # read and checked before the model loads
            recipe, calib_rows = prepare_calibration(recipe, pretrained)
        device = _resolve_device(kwargs.get("device"))
        torch.manual_seed(recipe.seed)

        t0 = time.perf_counter()
        loaded = load_language_model(
            pretrained,
            gguf_file=kwargs.get("gguf_file"),
            tokenizer=kwargs.get("tokenizer"),
            revision=kwargs.get("revision"),
            device=device,
            dtype=kwargs.get("dtype", "auto"),
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            attn_implementation=kwargs.get("attn_implementation"),
        )
        load_s = time.perf_counter() - t0
        if recipe.needs_calibration and loaded.processor is None:
            raise ConfigurationError("methods gptq and awq are supported for VLMs loaded from a checkpoint (calibrated as "
                                     "quant_vlm does); for a plain causal LM use method=uniform or method=rtn")
        cache_dir = (kwargs.get("cache_dir") or default_cache_dir()) if bool(kwargs.get("cache", True)) else None
        t0 = time.perf_counter()
        try:
            report = quantize_(loaded.model, recipe, calibration=lambda: _calibration_set(loaded, recipe, calib_rows),
                               check=bool(kwargs.get("verify", True)), cache_dir=cache_dir)
        except RecipeError as exc:
            raise ConfigurationError(str(exc)) from None
        quant_s = time.perf_counter() - t0

        lm = loaded.lm
        super().__init__(
            pretrained=lm,
            tokenizer=loaded.tokenizer,
            backend="seq2seq" if getattr(lm.config, "is_encoder_decoder", False) else "causal",
            revision=kwargs.get("revision") or "main",
            **{k: kwargs[k] for k in HFLM_ARG_KEYS if k in kwargs},
        )
        # HFLM looks the model's hash up by this name (get_model_info); a path or hub id, never the module.
        self.pretrained = loaded.path
        self.loaded = loaded
        self.quant_report = report
        self.metadata: dict[str, Any] = {
            "backend": f"lm-eval/{MODEL_NAME}",
            "model": {"name": loaded.name, "path": loaded.path, "revision": kwargs.get("revision"), "kind": loaded.kind,
                      "class": report.model_class, "family": report.family, "language_model_class": type(lm).__name__,
                      "served_by": "language_model" if lm is not loaded.model else "the model itself (input_ids only)",
                      "dtype": str(lm.dtype), "device": str(lm.device)},
            "quantization": report.to_dict(),
            "seed": recipe.seed,
            "versions": library_versions(),
            "timings_s": {"load": round(load_s, 3), "quantize": round(quant_s, 3)},
        }
        log.info("%s: %s loaded in %.1fs, quantized in %.1fs, bpw %.3f (llm %.3f)", MODEL_NAME, loaded.name, load_s, quant_s,
                 report.bpw["model"]["study"], report.bpw.get("llm", {}).get("study", float("nan")))

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model info plus our metadata under ``lmms_quant`` (moved to the top level of the results JSON)."""
        return {**super().get_model_info(), METADATA_KEY: self.metadata}
