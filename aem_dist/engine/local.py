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
from .dist import DistContext
from .checkpoint import STATE_FILE, load_dir, state_to_bytes, write_best_states
from .loop import EpochReport, FitResult, fit, fit_members
from .results import stored_config
from .runrecord import check_same_run
from .stages import model_init

log = logging.getLogger(__name__)
_EPOCH_DIR = re.compile(r"^epoch-(\d{6})$")


class LocalCheckpoints:
    """``folder/epoch-NNNNNN/state.pt`` per epoch; keeps the latest ``keep`` (plus, for a single run, its best).

    ``best_dirs[k]/state.pt`` receives member k's best-so-far state (what ``predict`` reads); a single
    run has one member. With ``config`` (a plain config dict, or one per member) every state records
    the config that trained it, so a resume can check it is continuing the same run.
    """

    def __init__(self, folder: str, keep: int = 2, options: StorageOptions | None = None, best_dirs: list[str] | None = None, config: Any = None):
        self.folder = str(folder)
        self.keep = keep
        self.options = options
        self.best_dirs = best_dirs or []
        self.config = config
        self.best: str | None = None  # a single run's best epoch folder, kept from eviction

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
        if report.is_best and not report.members:
            self.best = name
        if self.best_dirs:
            write_best_states(report, blob, self.best_dirs, self.options)
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
        return fit(cfg, options=options, on_epoch=on_epoch, model_init=model_init(cfg, None, options))
    if force_new:
        clear_run(run_dir, options)
    return run_local_members([cfg], storage.join(run_dir, "checkpoints"), [storage.join(run_dir, "best")], options, on_epoch,
        model_init(cfg, run_dir, options))[0]


def run_local_members(
    cfgs: list[Config],
    checkpoints: str,
    best_dirs: list[str],
    options: StorageOptions | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    model_init: dict | None = None,
    ctx: DistContext | None = None,
) -> list[FitResult]:
    """Train one run or a population in this process: a checkpoint per epoch in ``checkpoints`` (resumed
    from if present, after checking it was trained with the same configs), member k's best state in
    ``best_dirs[k]/state.pt``."""
    configs = [stored_config(c) for c in cfgs]  # as in run.json: secrets removed, URL passwords masked (state.pt is a file on storage)
    config = configs[0] if len(cfgs) == 1 else configs
    ckpt = LocalCheckpoints(checkpoints, keep=cfgs[0].run.checkpoint_keep, options=options, best_dirs=best_dirs, config=config)
    resume = ckpt.latest()
    if resume is not None:
        recorded = resume.get("config")
        for k, c in enumerate(configs):
            check_same_run(recorded if len(cfgs) == 1 or recorded is None else recorded[k], c, storage.redact(best_dirs[k].rsplit("/", 1)[0], options))
        if len(cfgs) == 1:
            ckpt.best = None if resume["best_epoch"] is None else f"epoch-{int(resume['best_epoch']):06d}"
        log.info("resuming %s after epoch %d", storage.redact(checkpoints, options), int(resume["epoch"]))

    def both(report: EpochReport) -> None:
        t0 = time.perf_counter()
        ckpt(report)
        report.extra["time/checkpoint_s"] = time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(report)

    return fit_members(cfgs, ctx=ctx, resume=resume, options=options, on_epoch=both, model_init=model_init)


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
