"""How the harness backends end a run that cannot go on: one clear line and a non-zero exit status.

lmms-eval 0.7.3's CLI catches every ``Exception`` around the evaluation, prints a traceback and
exits 0, so a CI regression eval with a broken model path would pass.  Our backends therefore turn
every error of loading, quantizing or evaluating into a :class:`BackendExit` (a ``SystemExit``,
which the CLI does not catch): the line ``lmms-quant: <stage> failed: <message>`` on stderr, and
the exit status of the error's kind (:data:`lmms_quant.errors.EXIT_STATUS`: 2 configuration,
3 data, 4 check, 1 anything else).  The traceback is printed too when lmms-eval runs with
``--verbosity=DEBUG`` (it sets ``VERBOSITY``) or ``LMMS_QUANT_TRACEBACK=1``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

from lmms_quant.errors import ConfigurationError, LmmsQuantError, exit_status

__all__ = ["BackendExit", "ConfigurationExit", "exit_on_error", "one_line"]


class BackendExit(SystemExit):
    """Ends the process with ``status``; ``message`` is the one line printed on stderr."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(status)
        self.message = message
        self.printed = False

    def __str__(self) -> str:
        return self.message


class ConfigurationExit(BackendExit):
    """Bad ``--model_args``: exit status 2 (a :class:`~lmms_quant.errors.ConfigurationError`)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"lmms-quant: invalid --model_args: {message}", exit_status(ConfigurationError()))


def one_line(exc: BaseException) -> str:
    """The first line of the message, after ``Type:`` unless it is one of ours (the rest is in the traceback)."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if isinstance(exc, LmmsQuantError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _close_progress_bars() -> None:
    """Close the progress bars left open (ours and lmms-eval's backends'), so the line starts on its own."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _want_traceback() -> bool:
    return os.environ.get("VERBOSITY", "").upper() == "DEBUG" or os.environ.get("LMMS_QUANT_TRACEBACK") == "1"


@contextlib.contextmanager
def exit_on_error(stage: str) -> Iterator[None]:
    """Run a block; any error leaves it as a :class:`BackendExit` after one line on stderr."""
    try:
        yield
    except BackendExit as exc:
        if not exc.printed:
            _close_progress_bars()
            print(exc.message, file=sys.stderr, flush=True)
            exc.printed = True
        raise
    except SystemExit:
        raise
    except Exception as exc:
        if _want_traceback():
            traceback.print_exc()
        message = f"lmms-quant: {stage} failed: {one_line(exc)}"
        _close_progress_bars()
        print(message, file=sys.stderr, flush=True)
        out = BackendExit(message, exit_status(exc))
        out.printed = True
        raise out from exc
