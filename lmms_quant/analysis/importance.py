"""Which component matters: importance over a bit-width grid, and non-additivity.

Component importance follows the study's Table 1 (arXiv 2601.15287): over the
configurations of one model, method and task, the features are the bit widths
of the components that vary and the target is the task score.  A random forest
is fitted to the grid and three importances are taken from it:

* ``rf``           impurity (mean decrease in variance) importance of the forest;
* ``permutation``  mean drop of the forest's R^2 when one feature's column is shuffled
                   (negative values clipped to 0);
* ``shap``         mean absolute SHAP value per feature (``shap.TreeExplainer``, exact
                   TreeSHAP).  Without the ``shap`` package it is left out, and the
                   consensus is the mean of the other two: scikit-learn has no TreeSHAP,
                   and impurity or permutation importance is not a substitute.

Each is normalised to shares that sum to 1, and the consensus share is their
mean.  ``r2_linear`` is the in-sample R^2 of an ordinary least-squares fit of
the score on the bit widths: near 1, the components act additively and
linearly; well below 1, interactions or thresholds dominate.

:func:`non_additivity` compares, for every pair of components, the drop with
both quantized against the sum of the drops with each alone (all else at 16).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

__all__ = ["Importance", "component_importance", "non_additivity", "shares", "shap_available"]


def shap_available() -> bool:
    try:
        with warnings.catch_warnings():  # shap 0.51 warns about matplotlib colormap calls at import
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            import shap  # noqa: F401
    except ImportError:
        return False
    return True


def shares(values: Sequence[float]) -> list[float] | None:
    """Non-negative values scaled to sum to 1; None when they are all zero."""
    v = np.clip(np.asarray(values, dtype=float), 0.0, None)
    total = float(v.sum())
    return None if total <= 0 else [float(x) / total for x in v]


@dataclass
class Importance:
    """Importance shares per feature (component), each method's and their consensus."""

    features: list[str]
    n: int
    rf: dict[str, float] | None = None
    permutation: dict[str, float] | None = None
    shap: dict[str, float] | None = None
    consensus: dict[str, float] | None = None
    r2_linear: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features, "n": self.n, "rf": self.rf, "permutation": self.permutation, "shap": self.shap,
                "consensus": self.consensus, "r2_linear": self.r2_linear, "notes": self.notes}


def component_importance(X: np.ndarray, y: np.ndarray, features: Sequence[str], *, seed: int = 0,
                         n_estimators: int = 200, n_repeats: int = 20) -> Importance:
    """Importance of each column of ``X`` (n configurations x k components, bit widths)
    for the scores ``y`` (n,).  Deterministic for a given ``seed``."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance
    from sklearn.linear_model import LinearRegression

    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    features = list(features)
    out = Importance(features=features, n=len(y))
    if len(y) < 3 or not features:
        out.notes.append(f"too few configurations ({len(y)}) or no varying component")
        return out
    if float(np.ptp(y)) == 0.0:
        out.notes.append("the score is the same in every configuration: no component matters on this grid")
        return out
    out.r2_linear = float(LinearRegression().fit(X, y).score(X, y))
    rf = RandomForestRegressor(n_estimators=n_estimators, random_state=seed).fit(X, y)

    def named(vals: list[float] | None) -> dict[str, float] | None:
        return None if vals is None else dict(zip(features, vals))

    out.rf = named(shares(rf.feature_importances_))
    perm = permutation_importance(rf, X, y, n_repeats=n_repeats, random_state=seed)
    out.permutation = named(shares(perm.importances_mean))
    if shap_available():
        import shap

        values = np.asarray(shap.TreeExplainer(rf).shap_values(X))
        out.shap = named(shares(np.abs(values).mean(axis=0)))
    else:
        out.notes.append("shap is not installed: the consensus averages random-forest and permutation importance only "
                         "(scikit-learn has no TreeSHAP equivalent)")
    parts = [p for p in (out.rf, out.permutation, out.shap) if p is not None]
    if parts:
        out.consensus = {f: float(np.mean([p[f] for p in parts])) for f in features}
    return out


def non_additivity(scores: Mapping[tuple[int, ...], float], components: Sequence[str], *,
                   higher_is_better: bool = True) -> list[dict[str, Any]]:
    """Pairwise interaction of quantization damage.

    ``scores`` maps a bit-width tuple (one entry per component, 16 = untouched)
    to the score.  For each pair of components (a, b) and bit widths (ba, bb)
    below 16 for which the grid holds the reference (all 16), a alone, b alone
    and both together (everything else at 16), one row: the drops
    ``drop_a``, ``drop_b``, ``drop_both`` (reference minus score, so positive is
    worse; sign flipped for lower-is-better metrics), ``drop_sum`` and
    ``excess = drop_both - drop_sum`` (> 0: quantizing both hurts more than the
    sum of each alone, the study's finding).
    """
    k = len(components)
    ref_key = (16,) * k
    if ref_key not in scores:
        return []
    sign = 1.0 if higher_is_better else -1.0
    ref = scores[ref_key]
    rows = []
    for i, j in combinations(range(k), 2):
        bits_i = sorted({key[i] for key in scores if key[i] != 16})
        bits_j = sorted({key[j] for key in scores if key[j] != 16})
        for bi in bits_i:
            for bj in bits_j:
                a = tuple(bi if n == i else 16 for n in range(k))
                b = tuple(bj if n == j else 16 for n in range(k))
                ab = tuple(bi if n == i else (bj if n == j else 16) for n in range(k))
                if a not in scores or b not in scores or ab not in scores:
                    continue
                da, db, dab = (sign * (ref - scores[x]) for x in (a, b, ab))
                rows.append({"a": components[i], "bits_a": bi, "b": components[j], "bits_b": bj, "reference": ref,
                             "drop_a": da, "drop_b": db, "drop_sum": da + db, "drop_both": dab, "excess": dab - (da + db)})
    return rows
