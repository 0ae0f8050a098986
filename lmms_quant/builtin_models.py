"""Models built from a fixed config and seed (no weights shipped, no network).

``tiny-random-llava`` is a 50k-parameter LLaVA with random weights and a real
processor (word-level tokenizer over the synthetic world's words, 32 px CLIP
image processor).  It exercises every code path in milliseconds; its answers
are noise.  The trained models of the zoo (``lmms_quant/zoo/models``) are the
ones whose accuracy means something.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

__all__ = ["BUILTIN_MODELS", "save_tiny_llava", "CHAT_TEMPLATE"]

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
_WORDS = (
    "user assistant answer the question using a single word or phrase provide one sentence caption for provided image "
    "what colour color shape is of thing how many shapes are there left right above below red green blue yellow purple white "
    "circle square triangle small large yes no 0 1 2 3 . , ? : ' ! a an in on to picture background dark"
)
#: "USER: <image>\n{text} ASSISTANT:" for both string and list message content (lmms-eval's llava_hf passes strings).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% else %}ASSISTANT: {{ m['content'] if m['content'] is string else m['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tiny_llava(path: str | Path, seed: int = 0, chat_template: bool = False) -> Path:
    """Write a tiny random LLaVA and its processor to ``path``; returns ``path``."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(re.findall(r"[a-z]+|\d+|[^\sa-z\d]", _WORDS)))
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + ["USER", "ASSISTANT"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(r"<image>", "isolated"), pre_tokenizers.Whitespace()])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=8, vision_feature_select_strategy="full",
                                 image_token="<image>", num_additional_image_tokens=1,
                                 chat_template=CHAT_TEMPLATE if chat_template else None)
    torch.manual_seed(seed)
    cfg = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**VISION), text_config=T.LlamaConfig(**TEXT, vocab_size=len(vocab)),
                        image_token_index=vocab["<image>"], vision_feature_select_strategy="full", vision_feature_layer=-1)
    cfg.text_config.pad_token_id, cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = 0, 1, 2
    model = T.LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(path)
    return path


#: name -> builder(path) for models built on first use.
BUILTIN_MODELS = {"tiny-random-llava": lambda path: save_tiny_llava(path, seed=0)}
