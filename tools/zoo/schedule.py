"""What every zoo recipe shares: AdamW with warm-up and cosine decay, the seeds, stage 1.

Each model's recipe (:class:`tools.zoo.train.Recipe`,
:class:`tools.zoo.train_itm.ItmRecipe`) extends :class:`Schedule` with its own
fields; :func:`tools.zoo.train.train_vision` (stage 1, the dense ViT loss) and
:func:`lr_at` read only these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmms_quant.world import DEFAULT_SEED

__all__ = ["Schedule", "lr_at"]


@dataclass(frozen=True)
class Schedule:
    """Optimisation settings; ``seed`` fixes the initialisation and the batch order."""

    steps: int = 3600
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    world_seed: int = DEFAULT_SEED
    eval_every: int = 300
    eval_items: int = 64  # calibration items of the learning curve
    # stage 1: the vision tower alone, dense per-patch labels
    vision_steps: int = 800
    vision_batch_size: int = 32
    vision_lr: float = 1e-3
    # stage 2: weight of the same dense loss next to the model's own losses
    aux_weight: float = 0.5
    # > 0: the dense labels also hold the column and row of the covering object's centre,
    # in this many bins each (teaches every patch where its object is, for relative positions)
    dense_position_bins: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.vision_steps < 0 or self.vision_batch_size < 1 or self.aux_weight < 0:
            raise ValueError(
                f"vision_steps and aux_weight must be >= 0 and vision_batch_size >= 1, got {self.vision_steps},"
                f" {self.aux_weight}, {self.vision_batch_size}"
            )
        if self.dense_position_bins < 0:
            raise ValueError(f"dense_position_bins must be >= 0 (0: no position labels), got {self.dense_position_bins}")


def lr_at(step: int, schedule: Schedule) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min_lr_ratio * lr``."""
    if step < schedule.warmup:
        return schedule.lr * (step + 1) / schedule.warmup
    t = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    floor = schedule.min_lr_ratio
    return schedule.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
