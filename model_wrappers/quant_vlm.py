"""``quant_vlm``: an lmms-eval model backend that quantizes a VLM per component on load.

    lmms-eval --model quant_vlm --model_args pretrained=Salesforce/blip2-opt-2.7b,bits_vit=4,bits_llm=3 --tasks ...

It is a thin layer over :func:`lmms_quant.quantize_`: parse and validate the
recipe (before anything loads), load the model, quantize it in memory,
check it, and serve lmms-eval's requests.  Its metadata (recipe, bits per
weight, quantized modules, versions, seed, weight hash) goes into the results
JSON under the key ``lmms_quant`` (see :mod:`lmms_quant.model_wrappers.plugin`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from lmms_quant.apply import quantize_
from lmms_quant.cache import default_cache_dir
from lmms_quant.calibration import CalibrationSet
from lmms_quant.calibration_data import build_calibration_set, prepare_calibration
from lmms_quant.checkpoints import AlreadyQuantizedError, ensure_not_quantized
from lmms_quant.errors import CheckError
from lmms_quant.models import (
    PROMPT_TEMPLATES,
    LoadedVLM,
    chat_template_of,
    check_device,
    format_prompt,
    is_bundled,
    is_encoder_decoder,
    load_vlm,
    parse_max_memory,
    resolve_dtype,
    resolve_pretrained,
)
from lmms_quant.provenance import library_versions
from lmms_quant.recipe import METHOD_ARG_KEYS, RECIPE_ARG_KEYS, RecipeError, recipe_from_args

from .exits import ConfigurationExit, exit_on_error
from .lmms_eval_backends import LMMS_EVAL_BACKENDS, backend_for, build_backend
from .lmms_eval_tasks import LoglikelihoodResult, check_judge_tasks
from .plugin import carry_metadata_into_results
from .registry import LIVE_BACKENDS

log = logging.getLogger(__name__)

#: model_args that configure loading and serving (the rest are recipe keys).
BACKEND_ARG_KEYS = ("pretrained", "revision", "device", "dtype", "device_map", "max_memory", "offload_folder", "batch_size", "max_new_tokens",
                    "trust_remote_code", "attn_implementation", "verify", "cache", "cache_dir",
                    "requantize", "save_quantized", "real_lowbit", "serve")
#: ``serve``: who turns requests into model calls (see :meth:`QuantVLM._choose_serving`).
SERVE_CHOICES = ("auto", "lmms_eval", "quant_vlm")


#: Task generation_kwargs handed to ``generate()`` as they are (beyond max_new_tokens, temperature, top_p, num_beams).
PASSED_GEN_KWARGS = ("min_length", "min_new_tokens", "length_penalty", "repetition_penalty", "no_repeat_ngram_size", "top_k")


class QuantVLM(lmms):
    """Per-component quantized VLM backend (a "simple" lmms-eval model).

    Every error of loading, quantizing or evaluating ends the process with one line and a
    non-zero status (:mod:`lmms_quant.model_wrappers.exits`), through plain ``lmms-eval`` too.
    """

    is_simple = True

    def __init__(self, loader: Callable[..., LoadedVLM] | None = None, **kwargs: Any) -> None:
        """``kwargs`` are the ``--model_args``.  ``loader`` (Python callers only) replaces
        :func:`lmms_quant.load_vlm` with the same signature, e.g. to hand out a model already in
        memory (the sweep); everything else (checks, calibration, quantization, metadata) is unchanged."""
        super().__init__()
        self._loader = loader or load_vlm
        #: what the results JSON records under ``lmms_quant`` (recipe, bpw, modules, hash, versions, serving);
        #: set when the model is quantized, read by the plugin (:func:`lmms_quant.model_wrappers.plugin.attach_metadata`)
        self.metadata: dict[str, Any] | None = None
        with exit_on_error("model load"):
            if not callable(self._loader):
                raise ConfigurationExit(f"loader must be a function like lmms_quant.load_vlm, got {self._loader!r} "
                                        "(a Python-API parameter, not a --model_args key)")
            self._setup(**kwargs)
        LIVE_BACKENDS.add(self)
        carry_metadata_into_results()

    def _parse(self, kwargs: dict[str, Any]) -> str:
        """Check every model_arg before anything loads; returns the device."""
        unknown = sorted(set(kwargs) - set(BACKEND_ARG_KEYS) - set(RECIPE_ARG_KEYS))
        if unknown:
            raise ConfigurationExit(
                f"unknown key(s) {unknown}; valid backend keys: {', '.join(BACKEND_ARG_KEYS)}; "
                f"valid recipe keys: {', '.join(RECIPE_ARG_KEYS)}"
            )
        recipe_args = {k: v for k, v in kwargs.items() if k in RECIPE_ARG_KEYS}
        try:
            self.recipe = recipe_from_args(recipe_args)
            bs = kwargs.get("batch_size")
            self.batch_size_per_gpu = 1 if bs in (None, "") else int(bs)
            self.max_new_tokens = int(kwargs.get("max_new_tokens", 64))
            device = check_device(kwargs.get("device"))
            resolve_dtype(kwargs.get("dtype", "auto"), device)
            if (kwargs.get("max_memory") or kwargs.get("offload_folder")) and not kwargs.get("device_map"):
                raise ValueError("max_memory and offload_folder need device_map (e.g. device_map=auto)")
            if kwargs.get("max_memory"):
                parse_max_memory(kwargs["max_memory"])
        except ValueError as exc:
            raise ConfigurationExit(str(exc)) from None
        if self.batch_size_per_gpu < 1:
            raise ConfigurationExit(f"batch_size must be >= 1, got {self.batch_size_per_gpu}")
        self._serve = str(kwargs.get("serve", "auto"))
        if self._serve not in SERVE_CHOICES:
            raise ConfigurationExit(f"unknown serve {self._serve!r}; valid: {', '.join(SERVE_CHOICES)}")
        widths = [k for k in kwargs if k.startswith("bits") or k == "recipe"]
        if self.recipe.is_noop and not widths and any(k in kwargs for k in METHOD_ARG_KEYS):
            given = sorted(k for k in kwargs if k in METHOD_ARG_KEYS)
            raise ConfigurationExit(
                f"{', '.join(given)} given but no component has a bit width, so nothing would be quantized; "
                "set bits (all components) or bits_vit / bits_connector / bits_llm (2-8), or drop the method"
            )
        return device

    def _setup(self, **kwargs: Any) -> None:
        device = self._parse(kwargs)
        torch.manual_seed(self.recipe.seed)
        name, _ = resolve_pretrained(kwargs.get("pretrained"))
        with exit_on_error("reading the calibration data"):  # before the model loads
            self.recipe, calib_rows = prepare_calibration(self.recipe, kwargs.get("pretrained"), model_name=name)

        t0 = time.perf_counter()
        loaded = self._loader(
            kwargs.get("pretrained"),
            revision=kwargs.get("revision"),
            device=device,
            dtype=kwargs.get("dtype", "auto"),
            device_map=kwargs.get("device_map"),
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            attn_implementation=kwargs.get("attn_implementation"),
            max_memory=kwargs.get("max_memory"),
            offload_folder=kwargs.get("offload_folder"),
        )
        self._model, self.processor, self.family = loaded.model, loaded.processor, loaded.family
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        # where inputs go: the first parameter in memory (accelerate's hooks move them on for offloaded modules)
        self._device = next((p.device for p in self._model.parameters() if not p.is_meta), torch.device(device))
        self._encoder_decoder = is_encoder_decoder(self._model)
        self._loaded = loaded
        self._revision = kwargs.get("revision")
        self._verify = bool(kwargs.get("verify", True))
        self._cache_dir = None
        if bool(kwargs.get("cache", True)):
            self._cache_dir = kwargs.get("cache_dir") or default_cache_dir()
        self._load_s = time.perf_counter() - t0
        self.report = None
        self._save_dir = kwargs.get("save_quantized")
        self._real_lowbit = bool(kwargs.get("real_lowbit", False))
        self._delegate = None
        self.serving = self._choose_serving(kwargs, device)
        if loaded.quantization is not None:
            if self.recipe.is_noop:  # evaluate the checkpoint as it was quantized elsewhere
                self._record_prequantized(loaded)
                return
            try:
                ensure_not_quantized(loaded.path, requantize=bool(kwargs.get("requantize", False)),
                                     detected=loaded.quantization, name=loaded.name)
            except AlreadyQuantizedError as exc:
                raise ConfigurationExit(str(exc)) from None
        if self.recipe.needs_calibration and self.recipe.calibration.source == "task":
            log.warning("calib_source=task: calibrating on the evaluated task's own documents (the study's protocol); "
                        "the calibration set overlaps the test split. Quantization happens when the first requests arrive.")
        else:
            self._quantize(lambda: build_calibration_set(self.processor, self.family, calib_rows or self.recipe.calibration,
                                                         self._device, self._model.dtype, encoder_decoder=self._encoder_decoder))

    def _choose_serving(self, kwargs: dict[str, Any], device: str) -> dict[str, Any]:
        """Who serves requests: lmms-eval's own backend for the family (``serve=lmms_eval``; the default
        where one exists, except for the bundled toys), or quant_vlm itself (``serve=quant_vlm``: the
        study's prompt formats, BLIP-2, batching).  Retrieval tasks are always answered by quant_vlm."""
        ref = backend_for(self.family)
        bundled = is_bundled(kwargs.get("pretrained"))
        # a checkpoint quantized elsewhere is dequantized by our loader: the backend could not load it itself
        plain = self._loaded.quantization is None or self._loaded.saved_report is not None
        choice = self._serve if self._serve != "auto" else ("lmms_eval" if ref is not None and not bundled and plain else "quant_vlm")
        if choice == "lmms_eval":
            if ref is None:
                raise ConfigurationExit(f"serve=lmms_eval: lmms-eval 0.7.3 has no backend of its own for the {self.family!r} family; "
                                        f"families it serves: {', '.join(sorted(LMMS_EVAL_BACKENDS))}; use serve=quant_vlm")
            if not plain:
                raise ConfigurationExit("serve=lmms_eval needs a model loaded from a plain checkpoint; use serve=quant_vlm")
            self._delegate = build_backend(ref, self._model, self._loaded.path, device=str(self._device),
                                           batch_size=self.batch_size_per_gpu, dtype=self._model.dtype)
            return {"by": ref.name, "backend_class": ref.class_path, "lmms_eval": library_versions().get("lmms-eval"),
                    "batch_size": self._delegate.batch_size,
                    "not_served_by_it": {k: f"quant_vlm ({why})" for k, why in ref.lacks}}
        template = "the processor's chat template" if chat_template_of(self.processor) else PROMPT_TEMPLATES.get(self.family, "{prompt}")
        return {"by": "quant_vlm", "prompt_format": template, "lmms_eval_backend": ref.name if ref else None}

    def _quantize(self, calibration) -> None:
        """Quantize the loaded model with the recipe and record the run's metadata."""
        t0 = time.perf_counter()
        try:
            report = quantize_(self._model, self.recipe, calibration=calibration, check=self._verify, cache_dir=self._cache_dir)
        except RecipeError as exc:
            raise ConfigurationExit(str(exc)) from None
        quant_s = time.perf_counter() - t0
        self.report = report
        loaded = self._loaded
        self.metadata = {
            "model": {"name": loaded.name, "path": loaded.path, "revision": self._revision,
                      "class": report.model_class, "family": report.family, "dtype": str(self._model.dtype),
                      "device": str(self._device)},
            "quantization": report.to_dict(),
            "seed": self.recipe.seed,
            "versions": library_versions(),
            "timings_s": {"load": round(self._load_s, 3), "quantize": round(quant_s, 3)},
            "serving": self.serving,
        }
        log.info("quant_vlm: %s loaded in %.1fs, quantized in %.1fs, bpw %.3f",
                 loaded.name, self._load_s, quant_s, report.bpw["model"]["study"])
        if self._save_dir:
            from lmms_quant.checkpoints import save_quantized

            save_quantized(self._model, report, self._save_dir, self.processor)
            self.metadata["saved_to"] = str(self._save_dir)
        if self._real_lowbit:  # after hashing and saving: this swaps the Linear modules for packed kernels
            from lmms_quant.checkpoints import layers_from_report, to_lowbit_

            kernels = to_lowbit_(self._model, layers_from_report(self._model, report))
            self.metadata["real_lowbit_layers"] = sorted(kernels)

    def _record_prequantized(self, loaded) -> None:
        """Metadata for a checkpoint that arrived quantized: its saved report, or what detection found."""
        self.report = loaded.saved_report or {"prequantized": loaded.quantization.to_dict()}
        self.metadata = {
            "model": {"name": loaded.name, "path": loaded.path, "revision": self._revision, "class": type(self._model).__name__,
                      "family": loaded.family, "dtype": str(self._model.dtype), "device": str(self._device)},
            "quantization": self.report,
            "seed": self.recipe.seed,
            "versions": library_versions(),
            "timings_s": {"load": round(self._load_s, 3), "quantize": 0.0},
            "serving": self.serving,
        }

    def _ensure_quantized(self, requests: list[Instance]) -> None:
        """``calib_source=task``: calibrate on this task's own documents (images and prompts, no targets)."""
        if self.report is not None:
            return
        spec = self.recipe.calibration
        rng = random.Random(spec.seed)
        chosen = rng.sample(range(len(requests)), min(spec.samples, len(requests)))
        batches = []
        for i in chosen:
            ctx, _, doc_to_visual, doc_id, task, split = requests[i].args
            ims = self._visuals(doc_to_visual, task, split, doc_id)
            batch = self._inputs([self._format(ctx, len(ims))], [ims])
            if self._encoder_decoder:  # no target: the decoder sees its start token, so its blocks get activations too
                start = self._model.config.text_config.decoder_start_token_id
                batch["decoder_input_ids"] = torch.tensor([[start]], device=self._device)
            batches.append(batch)
        tasks = sorted({r.args[4] for r in requests})
        self._quantize(CalibrationSet(batches, f"task:{','.join(tasks)}", len(batches), spec.seed, spec.max_seq_len,
                                      ["calibrated on the evaluated task's own documents: overlaps the test split"]))

    # ------------------------------------------------------------------ helpers
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def _format(self, context: str, n_images: int) -> str:
        """The prompt string for ``context`` with ``n_images`` images, in the family's format."""
        return format_prompt(self.processor, self.family, context, n_images)

    def _inputs(self, texts: list[str], images: list[list], padding_side: str = "left") -> dict:
        """Model inputs for a batch of prompts and their images (left padded for generation)."""
        flat = [im for ims in images for im in ims]
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if flat:
            kwargs["images"] = flat
        self.tokenizer.padding_side = padding_side
        try:
            batch = self.processor(**kwargs)
        finally:
            self.tokenizer.padding_side = "left"
        return {k: (v.to(self._device, self._model.dtype) if torch.is_floating_point(v) else v.to(self._device))
                for k, v in batch.items()}

    # ---------------------------------------------------------------- requests
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched generation, grouped by identical generation settings, left padded."""
        with exit_on_error("evaluation (generate_until)"):
            check_judge_tasks({r.args[4] for r in requests})
            out = self._generate_until(requests)
            self._check_ranks_agree()
            return out

    def loglikelihood(self, requests: list[Instance]) -> list[LoglikelihoodResult]:
        """lmms-eval's convention: ``(mean negative log-likelihood of the continuation, is_greedy)``, as
        :class:`LoglikelihoodResult` so that lmms-eval 0.7.x's multiple_choice scoring receives the pair."""
        with exit_on_error("evaluation (loglikelihood)"):
            check_judge_tasks({r.args[4] for r in requests})
            out = [LoglikelihoodResult(*r) for r in self._loglikelihood(requests)]
            self._check_ranks_agree()
            return out

    def _check_ranks_agree(self) -> None:
        """With several processes (torchrun), every rank quantizes the model itself: their weight hashes must be
        equal.  Checked once, after the first requests (lmms-eval starts the process group when it evaluates);
        recorded under ``ranks``; a rank that differs is a CheckError."""
        import torch.distributed as dist

        if self.metadata is None or "ranks" in self.metadata or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() < 2:
            return
        hashes = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, self.metadata["quantization"].get("weights_sha256"))
        self.metadata["ranks"] = {"world_size": dist.get_world_size(), "weights_sha256_equal": len(set(hashes)) == 1}
        if len(set(hashes)) != 1:
            raise CheckError(f"the {len(hashes)} ranks quantized to different weights (weights_sha256 per rank: "
                             f"{', '.join(str(h)[:12] for h in hashes)}); the results would mix models")

    def _forward(self, method: str, requests: list[Instance]):
        """Hand ``requests`` to lmms-eval's backend, which reads the same documents."""
        self._delegate.task_dict = self.task_dict
        self._delegate.cache_hook = self.cache_hook
        return getattr(self._delegate, method)(requests)

    def _generate_until(self, requests: list[Instance]) -> list[str]:
        self._ensure_quantized(requests)
        from lmms_quant.model_wrappers.retrieval import distributed, is_retrieval_request, serve_with_retrieval
        if any(map(is_retrieval_request, requests)) or distributed():  # retrieval tasks: one similarity matrix per gallery
            return serve_with_retrieval(self, requests, self._generate_answers)
        return self._generate_answers(requests)

    def _generate_answers(self, requests: list[Instance]) -> list[str]:
        if self._delegate is not None:
            return self._forward("generate_until", requests)
        order = sorted(range(len(requests)), key=lambda i: (repr(sorted(requests[i].args[1].items())), -len(requests[i].args[0])))
        results: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="quant_vlm generate")
        i = 0
        while i < len(order):
            key = repr(sorted(requests[order[i]].args[1].items()))
            batch_idx = [order[i]]
            while len(batch_idx) < self.batch_size and i + len(batch_idx) < len(order) and \
                    repr(sorted(requests[order[i + len(batch_idx)]].args[1].items())) == key:
                batch_idx.append(order[i + len(batch_idx)])
            i += len(batch_idx)
            gen_kwargs = dict(requests[batch_idx[0]].args[1])
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            texts, images = [], []
            for j in batch_idx:
                ctx, _, doc_to_visual, doc_id, task, split = requests[j].args
                ims = self._visuals(doc_to_visual, task, split, doc_id)
                images.append(ims)
                texts.append(self._format(ctx, len(ims)))
            inputs = self._inputs(texts, images)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            num_beams = int(gen_kwargs.get("num_beams", 1) or 1)
            gen = {
                "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                "do_sample": temperature > 0,
                "num_beams": num_beams,
                "pad_token_id": self.tokenizer.pad_token_id,
            }
            if temperature > 0:
                gen["temperature"] = temperature
                if gen_kwargs.get("top_p") is not None:
                    gen["top_p"] = float(gen_kwargs["top_p"])
            for key in PASSED_GEN_KWARGS:
                if gen_kwargs.get(key) is not None:
                    gen[key] = gen_kwargs[key]
            with torch.inference_mode():
                out = self._model.generate(**inputs, **gen)
            # A decoder-only LM returns the prompt and the new tokens; an encoder-decoder LM (BLIP-2's Flan-T5) the decoder's only.
            new_tokens = out if self._encoder_decoder else out[:, inputs["input_ids"].shape[1]:]
            decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for j, text in zip(batch_idx, decoded):
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                results[j] = text.strip()
                self.cache_hook.add_partial("generate_until", (requests[j].args[0], requests[j].args[1]), results[j])
            pbar.update(len(batch_idx))
        pbar.close()
        return results  # type: ignore[return-value]

    def _loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Decoder-only LMs score the continuation's tokens after the prompt in one sequence; an
        encoder-decoder LM (BLIP-2's Flan-T5) reads image and prompt in its encoder and scores the
        continuation as decoder labels (tokenized without special tokens, as lm-eval's seq2seq models do).
        """
        self._ensure_quantized(requests)
        if self._delegate is not None and "loglikelihood" not in dict(backend_for(self.family).lacks):
            return self._forward("loglikelihood", requests)
        results: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="quant_vlm loglikelihood")
        score = self._seq2seq_scores if self._encoder_decoder else self._causal_scores
        for i in range(0, len(requests), self.batch_size):
            prompts, continuations, images = [], [], []
            for ctx, target, doc_to_visual, doc_id, task, split in [r.args for r in requests[i:i + self.batch_size]]:
                doc = self.task_dict[task][split][doc_id]
                ims = self._visuals(doc_to_visual, task, split, doc_id)
                prompts.append(self._format(ctx, len(ims)))
                continuations.append(target if isinstance(target, str) else target(doc))
                images.append(ims)
            for logits, cont in score(prompts, continuations, images):
                nll = torch.nn.functional.cross_entropy(logits, cont)
                results.append((float(nll), bool((logits.argmax(-1) == cont).all())))
            pbar.update(len(prompts))
        pbar.close()
        return results

    def _causal_scores(self, prompts: list[str], continuations: list[str], images: list[list]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per request, the logits predicting each continuation token of ``prompt + continuation`` and those
        tokens.  Right padding: every real token keeps the positions and attention of a batch of one."""
        full = self._inputs([p + c for p, c in zip(prompts, continuations)], images, padding_side="right")
        n_prompt = self._inputs(prompts, images, padding_side="right")["attention_mask"].sum(1).tolist()
        n_full = full["attention_mask"].sum(1).tolist()
        with torch.inference_mode():
            logits = self._model(**full).logits
        return [(logits[j, n_prompt[j] - 1:n_full[j] - 1].float(), full["input_ids"][j, n_prompt[j]:n_full[j]])
                for j in range(len(prompts))]

    def _seq2seq_scores(self, prompts: list[str], continuations: list[str], images: list[list]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per request, the decoder logits for the continuation given image and prompt in the encoder, and its
        tokens (labels padded with -100 on the right: the causal decoder's real positions are unaffected)."""
        enc = self._inputs(prompts, images, padding_side="right")
        conts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        empty = [c for c, ids in zip(continuations, conts) if not ids]
        if empty:
            raise ValueError(f"loglikelihood: the continuation {empty[0]!r} has no tokens")
        width = max(map(len, conts))
        labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in conts], device=self._device)
        with torch.inference_mode():
            logits = self._model(**enc, labels=labels).logits
        return [(logits[j, :len(ids)].float(), labels[j, :len(ids)]) for j, ids in enumerate(conts)]

    def clean(self) -> None:
        """Free cached accelerator memory but keep the model.

        lmms-eval 0.7.3 calls ``clean()`` at the end of every ``evaluate`` and its
        default deletes every ``nn.Module`` attribute, so a model instance could
        not serve a second ``simple_evaluate`` (one loaded, quantized model for
        several tasks or sweep configurations).  We keep it.
        """
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("quant_vlm does not support multi-round generation (generate_until_multi_round); "
                                  "use single-round generate_until tasks")
