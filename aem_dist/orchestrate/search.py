"""Searches beyond the grid (``sweep.search: random | optuna``) and early stopping (``sweep.scheduler: asha``),
on Ray Tune's own algorithms.

* **Search.** ``sweep.space`` (dotted key → distribution) becomes Tune sampling domains
  (:func:`tune_space`); ``random`` is Tune's :class:`BasicVariantGenerator` seeded with
  ``sweep.search_seed``, ``optuna`` is Tune's :class:`OptunaSearch` (TPE, seeded) maximising
  :data:`SCORE_KEY`. Each drawn point is one unfused trial, named ``s<index>_<values>`` by
  :class:`SampleBook` the moment Tune creates it, and recorded in ``<out>/search.json`` (plain JSON,
  written atomically) before it trains.
* **Resume** never loads Tune's state (see :mod:`.resume`); the record is what carries a search over:
  ``random`` draws the same sequence again from the same seed, and each point that was drawn before gets
  its old name and folder back (so a finished trial returns at once, an unfinished one continues from
  its checkpoint); ``optuna`` re-submits the recorded points first (``points_to_evaluate``: finished ones
  return at once and tell Optuna their score) and draws only the remaining ``num_samples`` with a
  sampler seeded from (``search_seed``, points already drawn).
* **ASHA** (Tune's :class:`ASHAScheduler`) judges each trial on :data:`SCORE_KEY` — the best validation
  score so far by ``train.select_metric``, oriented so that higher is better (``loss`` is negated), so
  ``mode`` is ``max`` for every metric — at rungs ``grace_period × reduction_factor^k`` epochs of
  :data:`PROGRESS_KEY`. That key is left out of a trial's last epoch report, so a trial that reached its
  final epoch is never stopped (it writes its results.json). A stopped trial cannot say so itself (Tune
  ends it inside ``report``); :class:`EarlyStopRecorder`, a driver-side callback, writes its
  ``trials/<name>/stopped.json`` (best epoch so far and its val/test metrics) when Tune ends it without
  a results.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from ray import tune
from ray.tune import Callback

from .. import storage
from ..config import Config, config_with
from ..engine.results import stored_config, write_json
from ..storage import StorageOptions
from .errors import SweepError
from .trials import PROGRESS_KEY, SCORE_KEY, SEARCH_FILE, STOPPED_FILE, plain, sample_name, trial_spec

log = logging.getLogger(__name__)


def tune_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """``sweep.space`` (as :func:`aem_dist.config.parse_distribution` left it) → Tune sampling domains,
    with the same dotted keys (a trial's config is then ``{dotted key: value}``)."""
    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    out = {}
    for key, spec in space.items():
        ((kind, args),) = spec.items()
        out[key] = tune.choice(list(args)) if kind == "choice" else make[kind](*args)
    return out


def make_scheduler(cfg: Config) -> Any:
    """Tune's scheduler for ``sweep.scheduler`` (None for ``none``)."""
    return SCHEDULERS[cfg.sweep.scheduler](cfg) if cfg.sweep.scheduler != "none" else None


def _asha(cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=PROGRESS_KEY,
        metric=SCORE_KEY,
        mode="max",
        max_t=cfg.train.epochs,  # PROGRESS_KEY never reaches it: the last epoch's report carries no progress
        grace_period=cfg.sweep.asha_grace_period,
        reduction_factor=cfg.sweep.asha_reduction_factor,
    )


def optuna_seed(seed: int, drawn: int) -> int:
    """The TPE seed of a search that already drew ``drawn`` points (0: ``seed`` itself)."""
    return seed if drawn == 0 else int(np.random.SeedSequence([seed, drawn]).generate_state(1)[0])


def make_searcher(cfg: Config, recorded: list["Sample"], concurrency: int) -> tuple[Any, int | None]:
    """Tune's search algorithm for ``sweep.search`` (random/optuna) and the ``max_concurrent_trials`` Tune should apply
    (None where the searcher limits concurrency itself)."""
    return SEARCHERS[cfg.sweep.search](cfg, recorded, concurrency)


def _random(cfg: Config, recorded: list["Sample"], concurrency: int) -> tuple[Any, int | None]:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # no points_to_evaluate on resume: they would not advance the generator, which would then draw its
    # first points again; the same seed regenerates the same sequence and SampleBook renames it.
    # BasicVariantGenerator limits concurrency itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.sweep.search_seed), None


def _optuna(cfg: Config, recorded: list["Sample"], concurrency: int) -> tuple[Any, int | None]:
    from ray.tune.search.optuna import OptunaSearch

    seed = optuna_seed(cfg.sweep.search_seed, len(recorded))
    return OptunaSearch(metric=SCORE_KEY, mode="max", seed=seed, points_to_evaluate=[dict(s.values) for s in recorded] or None), concurrency


# sweep.search / sweep.scheduler → the Tune object (one registration each; the names the config accepts are its Literals)
SEARCHERS: dict[str, Callable[[Config, list["Sample"], int], tuple[Any, int | None]]] = {"random": _random, "optuna": _optuna}
SCHEDULERS: dict[str, Callable[[Config], Any]] = {"asha": _asha}


@dataclass
class Sample:
    name: str  # its folder trials/<name>
    values: dict[str, Any]  # dotted key → drawn value


_BOOKS: dict[str, "SampleBook"] = {}  # the driver's open books, by token (see SampleBook.namer)


class SampleBook:
    """Names the trials of a search as Tune creates them (through :meth:`namer`, the Tuner's
    ``trial_name_creator``, called in the driver) and keeps ``<out>/search.json`` up to date.

    A point drawn before (same values) gets its recorded name back, once per run; a new point gets the
    next index and is recorded before it trains."""

    def __init__(self, cfg: Config, out: str, options: StorageOptions, recorded: list[Sample]):
        self.keys = list(cfg.sweep.space)
        self.header = {"search": cfg.sweep.search, "search_seed": cfg.sweep.search_seed, "num_samples": cfg.sweep.num_samples, "space": cfg.sweep.space}
        self.url = storage.join(out, SEARCH_FILE)
        self.options = options
        self.samples = list(recorded)
        self.claimed: set[str] = set()

    def namer(self) -> "TrialNamer":
        """The ``trial_name_creator`` for this book. Tune deep-copies the spec that holds it for every
        trial and pickles it into its state, so it holds a token, never the book (whose storage options may
        carry credentials); the book stays in this process until :meth:`close`."""
        token = f"{id(self)}"
        _BOOKS[token] = self
        return TrialNamer(token)

    def close(self) -> None:
        _BOOKS.pop(f"{id(self)}", None)

    @classmethod
    def load(cls, cfg: Config, out: str, options: StorageOptions) -> "SampleBook":
        """The record of the search in ``out`` (empty when there is none). Raises SweepError for a record
        that is not one (not JSON, wrong shape)."""
        url = storage.join(out, SEARCH_FILE)
        try:
            data = json.loads(storage.read_bytes(url, options))
            samples = [Sample(str(s["name"]), dict(s["values"])) for s in data["samples"]]
        except FileNotFoundError:
            return cls(cfg, out, options, [])
        except (ValueError, KeyError, TypeError) as err:
            raise SweepError(f"{storage.redact(url, options)} is not a search record ({err}); remove it to start the search over") from None
        book = cls(cfg, out, options, samples)
        # sweep.* keys may change on --resume (they do not change a trial's result), but points drawn
        # under another search, seed or space are not this search's points
        changed = [f"sweep.{k}" for k in ("search", "search_seed", "space") if data.get(k) != book.header[k]]
        if changed:
            raise SweepError(f"{storage.redact(url, options)} records points drawn with other {', '.join(changed)} than this config: "
                             "choose another --out (or run.name) for a new search")
        if len(samples) > cfg.sweep.num_samples:
            raise SweepError(f"{storage.redact(url, options)} records {len(samples)} points drawn, more than sweep.num_samples={cfg.sweep.num_samples}: "
                             "a resumed search can grow, not shrink")
        return book

    def save(self) -> None:
        write_json(self.url, self.header | {"samples": [{"name": s.name, "values": s.values} for s in self.samples]}, self.options)

    def __call__(self, trial: Any) -> str:
        values = {k: plain(trial.config.get(k)) for k in self.keys}
        for s in self.samples:
            if s.name not in self.claimed and s.values == values:
                self.claimed.add(s.name)
                return s.name
        sample = Sample(sample_name(len(self.samples), values), values)
        self.samples.append(sample)
        self.claimed.add(sample.name)
        self.save()
        return sample.name


@dataclass(frozen=True)
class TrialNamer:
    """Tune's ``trial_name_creator`` for a search: hands the trial to the driver's open :class:`SampleBook`."""

    token: str

    def __call__(self, trial: Any) -> str:
        book = _BOOKS.get(self.token)
        if book is None:
            raise SweepError("a searched sweep created a trial after its record was closed")
        return book(trial)


def _split_metrics(result: dict[str, Any], split: str) -> dict[str, float]:
    prefix = f"{split}/"
    return {k[len(prefix) :]: v for k, v in result.items() if k.startswith(prefix) and isinstance(v, (int, float))}


class EarlyStopRecorder(Callback):
    """Writes ``trials/<name>/stopped.json`` for each trial Tune ends without a results.json — a trial
    ASHA stopped (a trial that ran to its end wrote results.json before its last report; one that failed
    ends through ``on_trial_error``). The record holds the epochs trained, the best epoch so far and its
    val/test metrics (from the trial's reports) and the trial's config, so that ``--resume`` keeps it.
    Pickled by Tune with its RunConfig: the storage options are left out."""

    def __init__(self, cfg: Config, out: str, options: StorageOptions):
        self.base = Config.model_validate(cfg.to_dict(redact=True))
        self.out = out
        self.options: StorageOptions | None = options
        self._last: dict[str, dict[str, Any]] = {}  # trial id → its last epoch report
        self._best: dict[str, dict[str, Any]] = {}  # trial id → its report of its best epoch so far

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"options": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        if "epoch" not in result:
            return
        self._last[trial.trial_id] = result
        if result.get("best/epoch") == result["epoch"]:
            self._best[trial.trial_id] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = self._last.get(trial.trial_id)
        if last is None or self.options is None:
            return
        best = self._best.get(trial.trial_id, {})
        for member in trial_spec(trial.config, str(trial)).members:
            run_dir = storage.join(self.out, "trials", member.name)
            if any(storage.exists(storage.join(run_dir, f), self.options) for f in ("results.json", STOPPED_FILE)):
                continue
            record = {
                "stopped_early": True,
                "epochs": int(last["epoch"]) + 1,
                "best_epoch": best.get("epoch"),
                "val": _split_metrics(best, "val"),
                "test": _split_metrics(best, "test"),
                "config": stored_config(config_with(self.base, member.values)),
            }
            write_json(storage.join(run_dir, STOPPED_FILE), record, self.options)
            log.info("trial %s stopped early by sweep.scheduler=%s after %d epoch(s)", member.name, self.base.sweep.scheduler, record["epochs"])
