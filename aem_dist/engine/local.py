"""A run in this process, without Ray: checkpoints under a folder or URL, resume from the latest one.

This is the fast path (``scaling.num_workers: 0``) used by tests and laptops. Under Ray Train the
same :func:`aem_dist.engine.loop.fit` runs in each worker and Ray keeps the checkpoints.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

from .. import storage
from ..config import Config
from ..storage import StorageOptions
from .checkpoint import STATE_FILE, load_dir, state_to_bytes
from .loop import EpochReport, FitResult, fit
from .runrecord import check_same_run

log = logging.getLogger(__name__)
_EPOCH_DIR = re.compile(r"^epoch-(\d{6})$")


class LocalCheckpoints:
    """``folder/epoch-NNNNNN/state.pt`` per epoch; keeps the latest ``keep`` plus the best.

    With ``best_dir`` the best-so-far state is also written to ``best_dir/state.pt`` (what ``predict`` reads).
    With ``config`` (a plain config dict) every state records the config that trained it, so a resume
    can check it is continuing the same run.
    """

    def __init__(self, folder: str, keep: int = 2, options: StorageOptions | None = None, best_dir: str | None = None, config: dict[str, Any] | None = None):
        self.folder = str(folder)
        self.keep = keep
        self.options = options
        self.best_dir = best_dir
        self.config = config
        self.best: str | None = None

    def _epochs(self) -> list[str]:
        fs, path = storage.open_fs(self.folder, self.options)
        if not fs.exists(path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        return sorted(n for n in names if _EPOCH_DIR.match(n) and fs.exists(f"{path}/{n}/{STATE_FILE}"))

    def latest(self) -> dict[str, Any] | None:
        dirs = self._epochs()
        return load_dir(storage.join(self.folder, dirs[-1]), self.options) if dirs else None

    def __call__(self, report: EpochReport) -> None:
        name = f"epoch-{report.epoch:06d}"
        state = report.state()
        if self.config is not None:
            state = {**state, "config": self.config}
        blob = state_to_bytes(state)
        storage.atomic_write_bytes(storage.join(self.folder, name, STATE_FILE), blob, self.options)
        if report.is_best:
            self.best = name
            if self.best_dir is not None:
                storage.atomic_write_bytes(storage.join(self.best_dir, STATE_FILE), blob, self.options)
        epochs = self._epochs()
        fs, path = storage.open_fs(self.folder, self.options)
        for old in epochs[: -self.keep]:
            if old != self.best:
                fs.rm(f"{path}/{old}", recursive=True)


def run_local(
    cfg: Config,
    run_dir: str | None = None,
    options: StorageOptions | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    force_new: bool = False,
) -> FitResult:
    """Train in this process. With ``run_dir``: a checkpoint per epoch in ``run_dir/checkpoints`` (resumed
    from if present) and the best-by-validation state in ``run_dir/best/state.pt``.

    Raises :class:`~aem_dist.engine.runrecord.RunConfigMismatch` when the latest checkpoint was trained
    with a config that differs from ``cfg`` in a result-relevant key; ``force_new`` clears the run's
    checkpoints, best state and results first and starts over."""
    if run_dir is None:
        return fit(cfg, options=options, on_epoch=on_epoch)
    if force_new:
        clear_run(run_dir, options)
    config = cfg.to_dict()
    ckpt = LocalCheckpoints(storage.join(run_dir, "checkpoints"), keep=cfg.run.checkpoint_keep, options=options, best_dir=storage.join(run_dir, "best"), config=config)
    resume = ckpt.latest()
    if resume is not None:
        check_same_run(resume.get("config"), config, storage.redact(run_dir, options))
        ckpt.best = None if resume["best_epoch"] is None else f"epoch-{int(resume['best_epoch']):06d}"
        log.info("resuming %s after epoch %d", storage.redact(run_dir, options), int(resume["epoch"]))

    def both(report: EpochReport) -> None:
        t0 = time.perf_counter()
        ckpt(report)
        report.extra["time/checkpoint_s"] = time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(report)

    return fit(cfg, resume=resume, options=options, on_epoch=both)


RUN_ARTEFACTS = ("checkpoints", "best", "results.json")


def clear_run(run_dir: str, options: StorageOptions | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """Remove what a previous run left in ``run_dir`` (checkpoints, best state, results) and the
    ``extra`` URLs (e.g. Ray's checkpoint folders); returns what was removed. Other files stay."""
    removed = []
    for url in [storage.join(run_dir, name) for name in RUN_ARTEFACTS] + list(extra):
        fs, path = storage.open_fs(url, options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            removed.append(storage.redact(url, options))
    if removed:
        log.info("--force-new: removed %s", ", ".join(removed))
    return removed
