"""Ctrl-C during a sweep: say what stopped and exactly what ``--resume`` will do.

aem-dist handles SIGINT itself (``TUNE_DISABLE_SIGINT_HANDLER=1``, set in :mod:`.ray_env`): Tune's own
handler would end the trials as if they had completed and advise ``Tuner.restore``, which aem-dist never
uses (see :mod:`.resume`). Instead the KeyboardInterrupt reaches :func:`aem_dist.orchestrate.sweep.run_sweep`,
which marks the grid points that were training as interrupted (live table, trials.csv), writes no summary
or report, and raises :class:`SweepInterrupted` with the line built here. The private Ray session then
shuts down and ends the trials; their last persisted checkpoints are where ``--resume`` continues.
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import storage
from ..config import Config
from ..storage import StorageOptions
from .errors import SweepError

INTERRUPTED = "INTERRUPTED"  # trials.csv status of a grid point that was training when the sweep was interrupted
EXIT_CODE = 130  # the shell's convention for a command ended by SIGINT


class SweepInterrupted(SweepError):
    """The sweep was interrupted (Ctrl-C); the message says what is kept and what --resume does."""

    interrupted = True


def has_checkpoint(cfg: Config, out: str, train_root: str, name: str, population: str, members: int, options: StorageOptions) -> bool:
    """Whether grid point ``name`` (trained in trial ``population`` of ``members`` points) has a checkpoint
    to continue from: in-process trials keep ``checkpoints/epoch-N`` under their folder (a population's
    under ``populations/<name>``), Ray Train runs ``checkpoint_*`` under Ray's storage (``train_root``,
    ``ray/train`` by default)."""
    if cfg.scaling.num_workers == 0:
        folder = storage.join(out, "trials", name) if members == 1 else storage.join(out, "populations", population)
        where, prefix = storage.join(folder, "checkpoints"), "epoch-"
    else:
        where, prefix = storage.join(train_root, population), "checkpoint_"
    try:
        fs, path = storage.open_fs(where, options)
        return any(str(p).rstrip("/").rsplit("/", 1)[-1].startswith(prefix) for p in fs.ls(path, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return False


def resume_plan(
    cfg: Config, out: str, train_root: str, rows: Sequence[dict[str, Any]], population_of: dict[str, tuple[str, int]], elapsed_s: float, options: StorageOptions
) -> str:
    """One line: what finished, what was interrupted, and what ``--resume`` keeps and trains."""
    from ..observe.tables import STOPPED_EARLY

    kept = [r for r in rows if r["status"] in ("TERMINATED", STOPPED_EARLY)]
    todo = [r for r in rows if r not in kept]
    interrupted = [r for r in todo if r["status"] == INTERRUPTED]
    resumable = [r for r in todo if has_checkpoint(cfg, out, train_root, r["trial"], *population_of.get(r["trial"], (r["trial"], 1)), options)]
    minutes, seconds = divmod(int(elapsed_s), 60)
    stopped = sum(1 for r in kept if r["status"] == STOPPED_EARLY)
    kept_what = f"{len(kept)} finished" + (f" ({stopped} stopped early)" if stopped else "")
    line = (f"interrupted (Ctrl-C) after {minutes // 60}:{minutes % 60:02d}:{seconds:02d}: {kept_what}, {len(interrupted)} interrupted, "
            f"{len(todo) - len(interrupted)} not started, of {len(rows)} grid points; no summary or report was written "
            f"(trials.csv records each state). --resume keeps the {len(kept)} finished (their results.json, metrics and wall time)")
    if todo:
        line += f" and trains the other {len(todo)}: {len(resumable)} from their last checkpoint, {len(todo) - len(resumable)} from the start"
    return line + f"; results stay in {storage.redact(out, options)}"
