"""What reaches the console, and the run log that keeps everything.

A run or sweep prints what its user acts on: our own announcements, the live table, warnings and
errors. Ray adds messages that say nothing to an aem-dist user — a token-auth notice at start, a
``PreemptionWatcher`` E-line from every Train controller, a worker-start warning on a loaded machine,
tracebacks of Ray's placement-group cleaner when several Ray instances share a host — and our Ray
workers log INFO lines (numerics, device cache, one line per epoch) that the live table already shows.
:data:`NOISE` names each of these; they leave the console but are kept, with everything else, in the
run log ``<out>/logs/<command>-<UTC time>.log`` (:class:`RunLog`).

Ray's own pieces are wired in :mod:`aem_dist.orchestrate.ray_env` (the only place that starts Ray):
Ray's log records reach our handlers (:func:`quiet_console`: the console one drops noise and Ray's
INFO), and lines that workers forward to the driver pass :func:`console_lines` before Ray prints them.

Example::

    with RunLog(out, "sweep", options) as runlog:
        print("log:", runlog.shown)          # every driver log record and worker line goes there
        run_sweep(cfg, out)
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from .. import storage
from ..storage import RedactingFilter, StorageOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Noise:
    """One kind of message kept off the console (but in the run log), and why."""

    name: str
    pattern: re.Pattern[str]
    why: str
    source: str = ""  # only from this Ray actor or task (its name in the forwarded batch), if set
    traceback: bool = False  # the traceback that follows the line (from the same source) is noise too


NOISE: tuple[Noise, ...] = (
    Noise(
        "token-auth", re.compile(r"Token authentication is enabled for this Ray cluster"), "Ray's notice that it chose token auth (aem-dist's own Ray sets it)"
    ),
    Noise(
        "preemption-watcher",
        re.compile(r"Actor with class name: 'PreemptionWatcher'.*max_restarts"),
        "Ray Train's controller, every run: a C++ E-line about its own actor",
    ),
    Noise("worker-start", re.compile(r"PYTHON worker processes have been started on node"), "raylet on a loaded machine: start-up is slow, nothing to act on"),
    Noise(
        "pg-cleaner",
        re.compile(r".*"),
        "Ray Train's placement-group cleaner fails to find its cluster when several Ray instances share a host",
        "PlacementGroupCleaner",
    ),
    Noise("dedup-hint", re.compile(r"Ray deduplicates logs by default"), "Ray's hint about its own log deduplication"),
    Noise(
        "exit-traceback",
        re.compile(r"^Exception ignored in: <(function WeakSet|_weakrefset|.*WeakSet)"),
        "a Ray worker ended by Ctrl-C: Python's exit report, not an error",
        traceback=True,
    ),
    Noise(
        "resource-request",
        re.compile(r"Failed to send resource request for train-"),
        "Ray Train's controller on a busy CPU; Ray's own message says it is safe to ignore",
        traceback=True,
    ),
    Noise("worker-info", re.compile(r"^(DEBUG|INFO) aem_dist\."), "our workers' INFO lines (numerics, device cache, epochs): the live table shows progress"),
)


def noise_of(line: str, source: str = "") -> Noise | None:
    """The :data:`NOISE` entry ``line`` (forwarded from Ray actor/task ``source``) matches, if any."""
    for noise in NOISE:
        if (not noise.source or noise.source in source) and noise.pattern.search(line):
            return noise
    return None


class ConsoleFilter(logging.Filter):
    """For console handlers: drops records that are :data:`NOISE`, and Ray's own records below WARNING
    (Tune's and Train's INFO chatter); the run log keeps them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("ray") and record.levelno < logging.WARNING:
            return False
        try:
            return noise_of(record.getMessage()) is None
        except Exception:  # noqa: BLE001  (a record that cannot format is not ours to drop)
            return True


def batch_source(batch: Mapping[str, Any]) -> str:
    """'PlacementGroupCleaner pid=18123' for a batch of lines Ray forwards from a worker process."""
    who = batch.get("actor_name") or batch.get("task_name") or ""
    return f"{who} pid={batch.get('pid')}".strip()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
_TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\):|\s+\S|[\w.]+(Error|Exception|SystemExit|KeyboardInterrupt)(: .*)?$)")
_TRACEBACK_END = re.compile(r"^[\w.]+(Error|Exception|SystemExit|KeyboardInterrupt)(: .*)?$")


def canonical(line: str) -> str:
    """A forwarded line without colour codes and Ray's "[repeated Nx across cluster]" suffix."""
    return _REPEATED.sub("", _ANSI.sub("", line))


class _Tracebacks:
    """Which forwarded lines belong to a noise traceback (:attr:`Noise.traceback`): from its head line to
    the exception line, per source; Ray's deduplication later repeats such lines (with a "[repeated Nx]"
    suffix and without the head), so the lines skipped once are remembered and their repeats skipped; the
    same text without that suffix (a first occurrence, e.g. of a real traceback) is shown."""

    def __init__(self, remember: int = 2000):
        self.lock = threading.Lock()
        self.inside: set[str] = set()  # sources in the middle of a noise traceback
        self.skipped: dict[str, None] = {}  # canonical lines skipped (insertion-ordered, bounded)
        self.remember = remember

    def is_noise(self, line: str, source: str) -> bool:
        text = canonical(line)
        with self.lock:
            noise = noise_of(text, source)
            if noise is not None:
                if noise.traceback:
                    self.inside.add(source)
                return True
            if source in self.inside and _TRACEBACK_LINE.match(text):
                self._remember(text)
                if _TRACEBACK_END.match(text):
                    self.inside.discard(source)
                return True
            self.inside.discard(source)
            return text in self.skipped and _REPEATED.search(_ANSI.sub("", line)) is not None  # only Ray's repeats of skipped lines

    def _remember(self, text: str) -> None:
        self.skipped[text] = None
        while len(self.skipped) > self.remember:
            self.skipped.pop(next(iter(self.skipped)))


_TRACEBACKS = _Tracebacks()


def console_lines(batch: Mapping[str, Any]) -> list[str]:
    """The lines of a forwarded batch that go to the console; all of them go to the run log."""
    source = batch_source(batch)
    lines = [str(line) for line in batch.get("lines", [])]
    runlog = RunLog.current
    if runlog is not None:
        runlog.write_lines(f"({source}) {line}" for line in lines)
    return [line for line in lines if not _TRACEBACKS.is_noise(line, source)]


class RunLog:
    """The log file of one command on one output folder: every driver log record (INFO and up, secrets
    redacted), every line Ray workers forward, and each live table. A local ``out`` gets
    ``out/logs/<command>-<UTC time>.log`` as it goes; for object storage the file is written in a local
    temp folder and uploaded there when the command ends (also after an error or Ctrl-C)."""

    current: "RunLog | None" = None  # the open run log of this process (one command at a time)

    def __init__(self, out: str, command: str, options: StorageOptions | None = None):
        self.options = options
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.url = storage.join(storage.absolute(out), "logs", f"{command}-{stamp}.log")
        self.remote = storage.is_remote(self.url)
        self._lock = threading.Lock()
        self._tmp: str | None = None
        self.path = ""
        self.handler: logging.Handler | None = None

    @property
    def shown(self) -> str:
        return storage.redact(self.url, self.options)

    def __enter__(self) -> "RunLog":
        if self.remote:
            self._tmp = tempfile.mkdtemp(prefix="aem-log-")
            self.path = os.path.join(self._tmp, os.path.basename(self.url))
        else:
            self.path = self.url
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handler = logging.FileHandler(self.path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactingFilter())
        self.handler = handler
        logging.getLogger().addHandler(handler)  # Ray's records arrive here too (see quiet_console)
        RunLog.current = self
        return self

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append lines (worker output, tables) with a timestamp, redacted."""
        if self.handler is None:
            return
        now = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        text = "".join(f"{now} {storage.redact(line, self.options)}\n" for line in lines)
        with self._lock:
            stream = self.handler.stream
            if stream is not None:
                stream.write(text)
                stream.flush()

    def __exit__(self, *exc: Any) -> None:
        RunLog.current = None
        handler, self.handler = self.handler, None
        if handler is None:
            return
        logging.getLogger().removeHandler(handler)
        handler.close()
        if self.remote and self._tmp:
            try:
                with open(self.path, "rb") as f:
                    storage.atomic_write_bytes(self.url, f.read(), self.options)
            except Exception as err:  # noqa: BLE001  (a log that cannot be uploaded must not hide the run's own outcome)
                log.warning("run log not uploaded to %s: %s", self.shown, storage.redact(err, self.options))
            finally:
                import shutil

                shutil.rmtree(self._tmp, ignore_errors=True)


def quiet_console(adopt_ray_logger: bool = False) -> None:
    """Keep Ray's noise off the console handlers (idempotent).

    ``adopt_ray_logger`` (before a ``ray.init(configure_logging=False)``, which empties Ray's logger and
    leaves its records to Python's last-resort stderr printer): Ray's logger loses its own handler and
    propagates to ours — the console handler, with :class:`ConsoleFilter` and secret redaction, and the
    run log. Otherwise the handlers Ray's logger has get :class:`ConsoleFilter`."""
    ray_logger = logging.getLogger("ray")
    if adopt_ray_logger:
        ray_logger.handlers.clear()
        ray_logger.propagate = True
    for logger in (logging.getLogger(), ray_logger):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
                    handler.addFilter(ConsoleFilter())
