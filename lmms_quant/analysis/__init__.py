"""The study's analysis as commands: sweeps, reports, regression gates and leaderboard records.

* :mod:`.results`     read lmms-eval results folders (with our ``lmms_quant`` key) into :class:`~.results.Run` rows,
  refusing files of the wrong shape with a message;
* :mod:`.sweep`       expand a sweep file into configurations and run them through lmms-eval's Python API,
  loading each full-precision model once; resumable;
* :mod:`.report`      tidy tables, Pareto fronts, sensitivity curves, fidelity, one HTML page;
* :mod:`.importance`  component importance (random forest, permutation, SHAP) and non-additivity;
* :mod:`.regress`     compare results against a baseline and fail on drops beyond a tolerance;
* :mod:`.leaderboard` versioned JSON records per configuration and their validation.

Nothing here is imported by ``import lmms_quant``; the optional dependencies
(``pip install lmms-quant[analysis]``) are imported only where used.
"""
