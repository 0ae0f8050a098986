"""lmms-quant: per-component quantization of vision-language models for lmms-eval.

Public API: a recipe (typed config) and one verb::

    from lmms_quant import Recipe, recipe_from_args, quantize_
    report = quantize_(model, recipe_from_args({"bits_llm": 3, "bits_vit": 4}))
"""

from .apply import QuantizationCheckError, QuantReport, quantize_
from .plan import plan
from .recipe import CalibrationSpec, ComponentRecipe, LayerRule, QuantSpec, Recipe, RecipeError, load_recipe, recipe_from_args

__all__ = [
    "CalibrationSpec",
    "ComponentRecipe",
    "LayerRule",
    "QuantSpec",
    "QuantReport",
    "QuantizationCheckError",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "plan",
    "quantize_",
    "recipe_from_args",
]

from ._version import __version__  # noqa: E402,F401
