"""In which groups and order the configurations run (jobs of an executor)."""

from __future__ import annotations

from .spec import SweepConfig


def _chunks(configs: list[SweepConfig], n: int) -> list[list[str]]:
    """``n`` nearly equal chunks, configurations of one model kept together where possible."""
    ordered = sorted(configs, key=lambda c: c.model.name)
    size = -(-len(ordered) // max(1, n))
    return [[c.id for c in ordered[i:i + size]] for i in range(0, len(ordered), size)]
