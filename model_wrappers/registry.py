"""The quant_vlm backends alive in this process, for the one check that runs without one in hand.

lmms-eval builds a retrieval task after the model but hands the task no reference to it, so the
task's preflight (refuse a run without a quant_vlm model, or with a family that has no retrieval
scorer, before the data set loads) looks here.  A weak set: a backend that is gone is gone from it.
Results metadata does not travel this way: each backend keeps its own (``QuantVLM.metadata``).
"""

from __future__ import annotations

import weakref

__all__ = ["LIVE_BACKENDS"]

LIVE_BACKENDS: weakref.WeakSet = weakref.WeakSet()
