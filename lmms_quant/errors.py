"""One error hierarchy for lmms-quant.

Every error the library raises on purpose derives from :class:`LmmsQuantError`, in one of three
kinds, each with a message that names the problem and the valid choices:

* :class:`ConfigurationError` — a recipe, a model argument or a file the user named is invalid;
* :class:`DataError` — calibration or evaluation data is missing, unreadable or of the wrong shape;
* :class:`CheckError` — a result failed a check (a weight off its grid, a hash that changed).

The lmms-eval and lm-eval backends and ``lmms-quant`` map each kind to one exit status
(:data:`EXIT_STATUS`); anything else that escapes them is an internal error (status 1).
"""

from __future__ import annotations

__all__ = ["LmmsQuantError", "ConfigurationError", "DataError", "CheckError", "EXIT_STATUS", "exit_status"]


class LmmsQuantError(Exception):
    """Base of every error lmms-quant raises on purpose."""


class ConfigurationError(LmmsQuantError, ValueError):
    """Invalid configuration: a recipe key or value, a model argument, a path that does not exist."""


class DataError(LmmsQuantError, ValueError):
    """Calibration or evaluation data that cannot be used: missing, unreadable, or without the needed columns."""


class CheckError(LmmsQuantError, RuntimeError):
    """A result failed a check: a quantized weight off its grid, a reloaded checkpoint whose hash changed."""


#: Exit status per kind; 1 is anything unexpected.
EXIT_STATUS = {ConfigurationError: 2, DataError: 3, CheckError: 4}


def exit_status(exc: BaseException) -> int:
    """The process exit status for ``exc``."""
    for kind, status in EXIT_STATUS.items():
        if isinstance(exc, kind):
            return status
    return 1
