"""Resolve a recipe against a model: which Linear gets which spec.

:func:`plan` walks the model once, using the architecture table
(:mod:`lmms_quant.architectures`) or the recipe's ``component_patterns``,
and returns a :class:`QuantPlan`: every candidate Linear inside a component's
blocks with its resolved :class:`~lmms_quant.recipe.QuantSpec`, plus the
ownership of every parameter (for bits-per-weight accounting).  It changes
nothing, works on meta-device models, and validates everything that can be
validated before work starts (e.g. a group size that does not divide a
layer's width).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from torch import nn

from .architectures import ARCHITECTURES, ATTN_PATTERN, LANGUAGE_MODELS, MLP_PATTERN, Architecture, architecture_for
from .recipe import COMPONENTS, QuantSpec, Recipe, RecipeError

__all__ = ["LayerTarget", "QuantPlan", "ComponentBlocks", "plan", "resolve_components", "UnsupportedModelError"]


class UnsupportedModelError(RecipeError):
    """The model's class is not in the architecture table and the recipe names no components."""


@dataclass(frozen=True)
class LayerTarget:
    """One Linear inside a component block, and what the recipe asks for it."""

    name: str
    component: str
    block: int
    kind: str  # "attn", "mlp" or "other"
    shape: tuple[int, ...]
    has_bias: bool
    spec: QuantSpec


@dataclass(frozen=True)
class ComponentBlocks:
    """The resolved modules of one component."""

    component: str
    label: str
    roots: tuple[str, ...]
    blocks: tuple[str, ...]


@dataclass
class QuantPlan:
    """The outcome of :func:`plan`.

    ``targets``: every Linear inside a component block (the study's quantizable
    set), including those the recipe leaves at 16 bits.  ``param_owner``:
    parameter name -> component or ``"other"``.  ``param_numel`` and
    ``param_bits``: element count and storage bits of every parameter.
    """

    model_class: str
    family: str
    components: dict[str, ComponentBlocks]
    targets: list[LayerTarget]
    param_owner: dict[str, str]
    param_numel: dict[str, int]
    param_bits: dict[str, int]
    skipped: list[str] = field(default_factory=list)

    @property
    def active(self) -> list[LayerTarget]:
        """Targets that will actually be quantized (bits < 16)."""
        return [t for t in self.targets if t.spec.active]


def _get(model: nn.Module, path: str) -> nn.Module | nn.Parameter | None:
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def resolve_components(model: nn.Module, recipe: Recipe | None = None) -> tuple[str, str, dict[str, ComponentBlocks]]:
    """Find each component's roots and blocks in ``model``.

    Returns ``(model_class, family, {component: ComponentBlocks})``.  Raises
    :class:`UnsupportedModelError` for a class the table does not know when the
    recipe gives no ``component_patterns``.
    """
    cls = type(model).__name__
    patterns = recipe.component_patterns if recipe is not None else None
    if patterns:
        out = {}
        names = [n for n, _ in model.named_modules() if n]
        for comp, pat in patterns.items():
            rx = re.compile(pat)
            blocks = tuple(n for n, m in model.named_modules() if n and rx.search(n) and isinstance(m, nn.Linear))
            if not blocks:
                raise RecipeError(f"component_patterns[{comp!r}] = {pat!r} matches no Linear module of {cls}")
            roots = tuple(n for n in names if rx.search(n))
            out[comp] = ComponentBlocks(comp, f"pattern {pat!r}", roots, blocks)
        return cls, "custom", out
    arch = architecture_for(model)
    if arch is None:
        raise UnsupportedModelError(
            f"model class {cls} is not in the architecture table; supported: {', '.join(sorted(ARCHITECTURES))}; text-only: {', '.join(sorted(LANGUAGE_MODELS))}. "
            "For another model, name its components in a recipe file by regex over module names, e.g.\n"
            "component_patterns:\n  vit: '^vision_encoder\\.layers\\.'\n  llm: '^decoder\\.layers\\.'"
        )
    return cls, arch.family, _components_from_arch(model, arch)


def _components_from_arch(model: nn.Module, arch: Architecture) -> dict[str, ComponentBlocks]:
    out = {}
    for comp in COMPONENTS:
        cmap = getattr(arch, comp)
        if cmap is None:
            continue
        roots = tuple(r for r in cmap.roots if _get(model, r) is not None)
        blocks: list[str] = []
        for path in cmap.blocks:
            obj = _get(model, path)
            if obj is None:
                continue
            if isinstance(obj, nn.ModuleList):
                blocks.extend(f"{path}.{i}" for i in range(len(obj)))
            else:
                blocks.append(path)
        if not roots or not blocks:
            raise RecipeError(
                f"{type(model).__name__}: component {comp!r} not found (looked for roots {list(cmap.roots)} "
                f"and blocks {list(cmap.blocks)}); the architecture table may not match this transformers version"
            )
        out[comp] = ComponentBlocks(comp, cmap.label, roots, tuple(blocks))
    return out


def _untouched(spec: QuantSpec) -> QuantSpec:
    return dataclasses.replace(spec, bits=16)


def _owner(name: str, roots: list[tuple[str, str]]) -> str:
    best, best_len = "other", -1
    for comp, root in roots:
        if (name == root or name.startswith(root + ".")) and len(root) > best_len:
            best, best_len = comp, len(root)
    return best


def plan(model: nn.Module, recipe: Recipe) -> QuantPlan:
    """Resolve ``recipe`` on ``model`` without touching any weight.

    Raises :class:`~lmms_quant.recipe.RecipeError` when a component is absent
    from the model but the recipe quantizes it, when an override or skip
    pattern matches nothing, or when a group size does not divide a layer's
    input width.
    """
    cls, family, comps = resolve_components(model, recipe)
    arch = architecture_for(model)
    attn_rx = re.compile(arch.attn_pattern if arch else ATTN_PATTERN)
    mlp_rx = re.compile(arch.mlp_pattern if arch else MLP_PATTERN)
    for comp in COMPONENTS:
        if comp not in comps and recipe.component(comp).spec.active and recipe.component(comp).explicit:
            raise RecipeError(f"{cls} has no {comp!r} component, but the recipe quantizes it; components here: {', '.join(comps)}")

    modules = dict(model.named_modules())
    targets: list[LayerTarget] = []
    skipped: list[str] = []
    rule_hits = [0] * len(recipe.overrides)
    skip_hits = [0] * len(recipe.skip)
    for comp, cb in comps.items():
        crec = recipe.component(comp)
        selected = crec.block_indices(len(cb.blocks))
        for bi, bpath in enumerate(cb.blocks):
            block = modules[bpath]
            sub = [("", block)] if isinstance(block, nn.Linear) else [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            for rel, mod in sub:
                name = f"{bpath}.{rel}" if rel else bpath
                kind = "attn" if attn_rx.search(rel) else "mlp" if mlp_rx.search(rel) else "other"
                spec = crec.spec
                if bi not in selected or (crec.layers != "all" and kind != crec.layers):
                    spec = _untouched(spec)
                for i, rule in enumerate(recipe.overrides):
                    if rule.matches(name):
                        rule_hits[i] += 1
                        spec = _untouched(spec) if rule.skip else rule.apply(spec)
                for i, pat in enumerate(recipe.skip):
                    if re.search(pat, name):
                        skip_hits[i] += 1
                        spec = _untouched(spec)
                if spec.active is False and crec.spec.active and name not in skipped:
                    skipped.append(name)
                shape = tuple(mod.weight.shape)
                spec = spec.for_width(shape[1])
                if spec.active and spec.group_size > 0 and shape[1] % spec.group_size:
                    raise RecipeError(
                        f"group_size {spec.group_size} does not divide the input width {shape[1]} of {name} "
                        f"(shape {list(shape)}); choose a divisor of {shape[1]}, -1 (per channel) or 0 (per tensor)"
                    )
                targets.append(LayerTarget(name, comp, bi, kind, shape, mod.bias is not None, spec))
    for i, n in enumerate(rule_hits):
        if n == 0:
            raise RecipeError(f"override pattern {recipe.overrides[i].pattern!r} matches no quantizable Linear of {cls}")
    for i, n in enumerate(skip_hits):
        if n == 0:
            raise RecipeError(f"skip pattern {recipe.skip[i]!r} matches no quantizable Linear of {cls}")

    roots = [(c, r) for c, cb in comps.items() for r in cb.roots]
    owner, numel, bits = {}, {}, {}
    for pname, p in _named_tensors(model):
        owner[pname] = _owner(pname, roots)
        numel[pname] = p.numel()
        bits[pname] = p.element_size() * 8
    return QuantPlan(cls, family, comps, targets, owner, numel, bits, skipped)


def _named_tensors(model: nn.Module):
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # tied weights (embeddings / lm_head) count once
        seen.add(id(p))
        yield name, p


