"""The summary never chooses a λ behind a trial that was stopped early (it never reached the final epoch)."""

import math

from aem_dist.observe.tables import STOPPED_EARLY, summarize, summary_markdown, trial_row, write_tables, read_csv


def _row(lam, seed, val, *, status="TERMINATED", epochs=5, lr=1e-3):
    return {"trial": f"lam={lam}_seed={seed}_lr={lr}", "status": status, "loss.lam": lam, "train.seed": seed, "train.lr": lr, "best_epoch": 0, "epochs": epochs,
            "val_auc": val, "val_f1": val, "test_auc": 0.5, "test_f1": 0.5, "test_attn_entropy": 1.0}  # fmt: skip


def test_a_stopped_trial_never_gives_the_chosen_lambda():
    rows = [
        _row(0.0, 0, 0.6), _row(0.0, 1, 0.6),
        _row(0.1, 0, 0.99, status=STOPPED_EARLY, epochs=2), _row(0.1, 1, 0.95),  # best val, but one seed was stopped
        _row(0.5, 0, 0.99, status=STOPPED_EARLY, epochs=1), _row(0.5, 1, 0.99, status=STOPPED_EARLY, epochs=1),
        _row(1.0, 0, 0.7), _row(1.0, 1, 0.7),
    ]  # fmt: skip
    summary = {r["loss.lam"]: r for r in summarize(rows, ["loss.lam", "train.seed"])}
    assert [(lam, s["n"], s["stopped_early"]) for lam, s in summary.items()] == [(0.0, 2, 0), (0.1, 1, 1), (0.5, 0, 2), (1.0, 2, 0)]
    assert summary[0.1]["val_auc_mean"] == 0.95  # the stopped seed is left out of the means
    assert math.isnan(summary[0.5]["val_score_mean"])
    assert [lam for lam, s in summary.items() if s["chosen"]] == [1.0]
    text = summary_markdown(list(summary.values()), ["loss.lam"])
    assert "| stopped early |" in text and "never chosen" in text


def test_no_stopped_trials_no_column():
    summary = summarize([_row(0.0, 0, 0.6), _row(0.1, 0, 0.7)], ["loss.lam", "train.seed"])
    assert [s["chosen"] for s in summary] == [False, True] and "stopped early" not in summary_markdown(summary, ["loss.lam"])


def test_searched_keys_are_chosen_over(tmp_path):
    """A search draws λ and lr: one chosen row overall (a grid would choose λ per lr)."""
    rows = [_row(0.01, 0, 0.6, lr=1e-3), _row(0.2, 0, 0.8, lr=2e-3), _row(0.05, 0, 0.7, lr=3e-3)]
    assert sum(s["chosen"] for s in summarize(rows, ["loss.lam", "train.lr"])) == 3  # grid: λ per lr
    summary = write_tables(str(tmp_path), rows, ["loss.lam", "train.lr"], searched=["loss.lam", "train.lr"])
    assert [(s["loss.lam"], s["chosen"]) for s in summary] == [(0.01, False), (0.05, False), (0.2, True)]
    assert [r["chosen"] for r in read_csv(str(tmp_path / "summary.csv"))] == [False, False, True]


def test_trial_row_epochs():
    finished = trial_row("t", {"loss.lam": 0.1}, {"best_epoch": 3, "config": {"train": {"epochs": 5}}, "val": {}, "test": {}}, status="TERMINATED", wall_s=1.0)
    stopped = trial_row("t", {"loss.lam": 0.1}, {"best_epoch": 0, "epochs": 2, "stopped_early": True, "config": {"train": {"epochs": 5}}}, status=STOPPED_EARLY, wall_s=1.0)
    assert (finished["epochs"], stopped["epochs"], stopped["status"]) == (5, 2, STOPPED_EARLY)
