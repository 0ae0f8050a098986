"""The zoo: tiny VLMs trained from scratch on the synthetic world, shipped in the repo.

``lmms_quant/zoo/models/<name>/`` holds each model as a transformers folder
(config, safetensors weights, tokenizer, processor, ``TRAINING.md``) that
``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` load offline.

* ``toy-llava``: ``LlavaForConditionalGeneration`` (CLIP vision tower, MLP
  projector, Llama LM); see :mod:`lmms_quant.zoo.toy_llava`.
* ``toy-blip2-itm``: ``Blip2ForImageTextRetrieval`` (BLIP-2 ViT, Q-Former, ITC and
  ITM heads) for retrieval; see :mod:`lmms_quant.zoo.toy_blip2_itm` and
  :mod:`tools.zoo.train_itm`.
* ``toy-blip2``: ``Blip2ForConditionalGeneration`` (BLIP-2 ViT, Q-Former, OPT LM) for
  captioning and VQA, started from the ViT and Q-Former of the first toy-blip2-itm
  recipe (``STARTING_POINTS`` in :mod:`tools.zoo.train`, retrained first); see
  :mod:`lmms_quant.zoo.toy_blip2` (the training loop is toy-llava's,
  :data:`tools.zoo.train.FAMILIES` holds what differs).

Rebuild a model with ``python -m tools.zoo.train --model NAME`` and check it
with ``python -m tools.zoo.evaluate --model NAME --rtn``.
"""

from pathlib import Path

__all__ = ["MODELS_DIR", "model_dir"]

MODELS_DIR = Path(__file__).resolve().parent / "models"


def model_dir(name: str) -> Path:
    """Folder of the shipped model ``name`` (e.g. ``"toy-llava"``)."""
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        known = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()) if MODELS_DIR.is_dir() else []
        raise FileNotFoundError(f"no shipped model {name!r} under {MODELS_DIR}; known: {known}")
    return path
