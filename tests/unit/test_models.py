"""Model resolution: the embedded default, built-in and zoo names, bad paths, prompt formats."""

import pytest

from lmms_quant.builtin_models import CHAT_TEMPLATE
from lmms_quant.models import DEFAULT_MODEL, format_prompt, load_vlm, resolve_dtype, resolve_pretrained, zoo_models


def test_default_model_loads_offline_without_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_QUANT_CACHE", str(tmp_path))
    assert DEFAULT_MODEL in zoo_models()
    v = load_vlm(None)
    assert v.name == DEFAULT_MODEL and v.family == "llava"
    assert type(v.model).__name__ == "LlavaForConditionalGeneration"


def test_bad_pretrained_paths_name_the_choices():
    with pytest.raises(FileNotFoundError, match=r"pretrained='/no/such/dir': no such folder; give a local checkpoint folder, a hub id"):
        resolve_pretrained("/no/such/dir")
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'; valid: auto, float32"):
        resolve_dtype("float8", "cpu")


def test_prompt_formats_without_and_with_a_chat_template(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_QUANT_CACHE", str(tmp_path))
    v = load_vlm("tiny-random-llava")
    assert format_prompt(v.processor, "llava", "what colour?", 1) == "USER: <image>\nwhat colour? ASSISTANT:"
    assert format_prompt(v.processor, "llava", "hello", 0) == "USER: hello ASSISTANT:"
    assert format_prompt(v.processor, "blip2", "Question: x Short answer:", 1) == "Question: x Short answer:"
    v.processor.chat_template = CHAT_TEMPLATE
    assert format_prompt(v.processor, "llava", "what colour?", 1) == "USER: <image>\nwhat colour? ASSISTANT:"
