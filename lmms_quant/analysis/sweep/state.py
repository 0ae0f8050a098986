"""The output folder is the sweep's state: which configurations are done, failed or pending,
the manifest, the progress file, per-configuration locks, and atomic writes."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import CONFIG_FILE, FAILED_FILE, LOCK_FILE, MANIFEST, MANIFEST_VERSION, PROGRESS, STAGING_PREFIX, SweepConfig, SweepSpec, expand


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one (tmp + fsync + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _results_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*_results.json")) if folder.is_dir() else []


@dataclass
class ConfigState:
    config: SweepConfig
    status: str  # done | failed | pending | conflict
    detail: str = ""


def sweep_status(spec: SweepSpec, out: Path) -> list[ConfigState]:
    """The state of every configuration, read from the output folder."""
    states = []
    for cfg in expand(spec):
        folder = out / cfg.id
        digest = cfg.digest(spec)
        recorded = None
        if (folder / CONFIG_FILE).is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                recorded = json.loads((folder / CONFIG_FILE).read_text()).get("digest")
        if _results_files(folder):
            if recorded is not None and recorded != digest:
                states.append(ConfigState(cfg, "conflict", f"its result was made with other settings (digest {recorded}, now {digest})"))
            else:
                states.append(ConfigState(cfg, "done"))
        elif (folder / FAILED_FILE).is_file():
            try:
                err = json.loads((folder / FAILED_FILE).read_text())
                detail = f"{err.get('error_type')}: {err.get('message')}"
            except (OSError, json.JSONDecodeError):
                detail = "failed (unreadable FAILED.json)"
            states.append(ConfigState(cfg, "failed", detail))
        else:
            states.append(ConfigState(cfg, "pending"))
    return states


def _runnable(folder: Path, retry_failed: bool) -> str | None:
    """None when the configuration in ``folder`` should run now, else why not (``done``/``failed``)."""
    if _results_files(folder):
        return "done"
    if (folder / FAILED_FILE).is_file() and not retry_failed:
        return "failed"
    return None


def _write_manifest(spec: SweepSpec, out: Path) -> None:
    path = out / MANIFEST
    configs = [c.describe(spec) for c in expand(spec)]
    manifest = {"manifest_version": MANIFEST_VERSION, "name": spec.name, "spec": spec.to_dict(), "configs": configs}
    if path.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            old = json.loads(path.read_text())
            manifest["created"] = old.get("created")
            # configurations of an earlier spec stay listed: their results are still in the folder
            known = {c["id"] for c in configs}
            manifest["earlier_configs"] = [c for c in old.get("configs", []) + old.get("earlier_configs", []) if c["id"] not in known]
    manifest.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
    manifest["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
    _write_json(path, manifest)


class Progress:
    """Counts for the sweep as a whole; writes ``progress.json`` and reports a line per configuration."""

    def __init__(self, spec: SweepSpec, out: Path, emit: Callable[[str], None]):
        self.spec, self.out, self.emit = spec, out, emit
        self.durations: list[float] = []
        self.started = time.time()

    def update(self, last: str | None = None, last_s: float | None = None, status: str = "") -> dict[str, Any]:
        if last_s is not None:
            self.durations.append(last_s)
        states = sweep_status(self.spec, self.out)
        counts = {k: sum(s.status == k for s in states) for k in ("done", "failed", "pending", "conflict")}
        remaining = counts["pending"]
        eta = (sum(self.durations) / len(self.durations)) * remaining if self.durations else None
        info = {"name": self.spec.name, "total": len(states), "done": counts["done"], "failed": counts["failed"],
                "remaining": remaining, "conflict": counts["conflict"], "eta_s": round(eta, 1) if eta is not None else None,
                "elapsed_s": round(time.time() - self.started, 1), "last": last, "last_status": status,
                "updated": _dt.datetime.now().isoformat(timespec="seconds")}
        _write_json(self.out / PROGRESS, info)
        line = (f"[sweep {self.spec.name}] {info['done']}/{info['total']} done, {info['failed']} failed, "
                f"{remaining} remaining" + (f", ETA {_fmt_s(eta)}" if eta is not None else ""))
        if last:
            line += f" | {last}: {status}" + (f" in {_fmt_s(last_s)}" if last_s is not None else "")
        self.emit(line)
        return info


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


@contextlib.contextmanager
def _claim(folder: Path) -> Iterator[bool]:
    """Exclusive, non-blocking lock on ``folder/.lock``; yields False when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # closing releases the lock (and so does the death of the process)


def _clean_partial(folder: Path) -> None:
    """Remove what an interrupted attempt left: staging folders, and samples without their results file."""
    for p in folder.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    dates = {f.name[: -len("_results.json")] for f in _results_files(folder)}
    for p in folder.glob("*_samples_*.jsonl"):
        if p.name.split("_samples_")[0] not in dates:
            p.unlink(missing_ok=True)


def _record_failure(cfg: SweepConfig, out: Path, exc: BaseException) -> None:
    folder = out / cfg.id
    attempts = 1
    if (folder / FAILED_FILE).is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            attempts = int(json.loads((folder / FAILED_FILE).read_text()).get("attempts", 0)) + 1
    _write_json(folder / FAILED_FILE, {
        "id": cfg.id, "error_type": type(exc).__name__, "message": str(getattr(exc, "message", None) or exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "attempts": attempts,
        "time": _dt.datetime.now().isoformat(timespec="seconds"), "host": os.uname().nodename, "pid": os.getpid(),
    })
