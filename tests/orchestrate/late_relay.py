"""``python -m tests.orchestrate.late_relay sweep ...``: the aem-dist CLI with the last epoch's relay to Tune held back
until the trial's ``fit()`` has returned — the interleaving that hung sweeps (issue 26), forced instead of hoped for.

In every trial process two hooks hold the report of the last epoch (metrics with an ``epoch`` and no
``progress/epochs``), whichever way it travels:
- Ray's ``TuneReportCallback`` path: the trial actor's main thread relays the Train controller's report
  (``_TrainSession.report``); held until ``fit()`` returned and the trial thread has ended or filled Tune's
  one-slot result queue (its own report after ``fit()``), so the relay's put comes second;
- a report from any other thread (the trial function's own thread): held until ``fit()`` returned.
Each hold prints ``late relay held`` once.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time

HOLD_LIMIT_S = 300.0  # a hold never outlasts this (the test's own timeout is the hang detector)


def _last_epoch(metrics: dict) -> bool:
    return isinstance(metrics, dict) and "epoch" in metrics and "progress/epochs" not in metrics


def _wait(condition) -> None:
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("late relay held", file=sys.stderr, flush=True)


def _install_hooks() -> None:
    import ray.tune
    from ray.train._internal.session import _TrainSession
    from ray.train.torch import TorchTrainer

    if getattr(_TrainSession, "_late_relay", None) is not None:
        return
    # Run as __main__, this module travels to the trial by value: its state lives in the trial's process.
    _fit_returned = _TrainSession._late_relay = threading.Event()
    fit, report, tune_report = TorchTrainer.fit, _TrainSession.report, ray.tune.report

    def held_fit(self, *args, **kwargs):
        try:
            return fit(self, *args, **kwargs)
        finally:
            _fit_returned.set()

    def held_session_report(self, metrics, checkpoint=None):
        if threading.current_thread() is threading.main_thread() and _last_epoch(metrics):
            _wait(lambda: _fit_returned.is_set() and (not self.training_thread.is_alive() or self.result_queue.full()))
        return report(self, metrics, checkpoint)

    def held_tune_report(metrics, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread() and _last_epoch(metrics) and not _fit_returned.is_set():
            _wait(_fit_returned.is_set)
        return tune_report(metrics, *args, **kwargs)

    TorchTrainer.fit = held_fit
    _TrainSession.report = held_session_report
    ray.tune.report = held_tune_report


def held_run_trial(config, *, base, out, single, searched=False):
    """The sweep's trial function with the hooks installed first (in the trial's process, where the
    sweep module's ``run_trial`` is Ray's original)."""
    _install_hooks()
    return importlib.import_module("aem_dist.orchestrate.sweep").run_trial(config, base=base, out=out, single=single, searched=searched)


def main() -> None:
    from aem_dist.cli import main as cli_main
    from aem_dist.orchestrate import sweep

    sweep.run_trial = held_run_trial  # defined in __main__: pickled by value, so trial processes need not import tests/
    cli_main()


if __name__ == "__main__":
    main()
