"""Searches beyond the grid and early stopping, end to end on a private local Ray (in-process trials,
demo preset, 1–3 epochs): a random and an Optuna search of 6 points, an ASHA grid that must stop trials,
and resuming a searched sweep without drawing or training its finished points again."""

import json
import shutil

import pytest

from aem_dist.config import load_config
from aem_dist.observe.tables import read_csv

pytestmark = pytest.mark.integration

SPACE = "sweep.space={loss.lam: {loguniform: [1.0e-4, 1]}, train.lr: {loguniform: [1.0e-3, 1.0e-2]}}"
BASE = ["train.progress=false", "metrics.port=0", "metrics.grace_s=0", "scaling.num_workers=0", "sweep.grid={}"]


def _sweep(demo_data, out, *overrides, resume=False):
    from aem_dist.orchestrate.sweep import run_sweep

    said = []
    cfg = load_config("demo", [f"data.root={demo_data}", *BASE, *overrides])
    run_sweep(cfg, str(out), resume=resume, announce=said.append)
    return {r["trial"]: r for r in read_csv(str(out / "trials.csv"))}, said


def _search(demo_data, out, kind, resume=False):
    # no report: the ASHA test checks what the report says of a scheduled sweep; here it would only cost time
    return _sweep(demo_data, out, "train.epochs=1", f"sweep.search={kind}", "sweep.num_samples=6", "sweep.search_seed=3", "sweep.report=false", SPACE, resume=resume)


def _samples(out):
    return json.loads((out / "search.json").read_text())["samples"]


def _mtimes(out, names):
    return {n: (out / "trials" / n / "results.json").stat().st_mtime_ns for n in names}


def _check_search(rows, said, out, kind):
    assert any(f"sweep.search={kind}: 6 point(s)" in s and "unfused" in s for s in said), said
    samples = _samples(out)
    assert [s["name"] for s in samples] == sorted(rows) and len(rows) == 6
    for s in samples:
        row = rows[s["name"]]
        assert row["status"] == "TERMINATED" and row["epochs"] == 1
        assert row["loss.lam"] == pytest.approx(s["values"]["loss.lam"]) and row["train.lr"] == pytest.approx(s["values"]["train.lr"])
        assert 1e-4 <= row["loss.lam"] <= 1 and 1e-3 <= row["train.lr"] <= 1e-2
        res = json.loads((out / "trials" / s["name"] / "results.json").read_text())
        assert res["config"]["loss"]["lam"] == s["values"]["loss.lam"] and res["config"]["train"]["lr"] == s["values"]["train.lr"]
    assert len({r["loss.lam"] for r in rows.values()}) == 6
    summary = read_csv(str(out / "summary.csv"))
    # the drawn keys are chosen over, like λ: exactly one chosen row, the best by validation
    chosen = [s for s in summary if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_score_mean"] == max(s["val_score_mean"] for s in summary)


def test_random_search_then_resume_draws_the_same_points(local_ray, demo_data, tmp_path):
    out = tmp_path / "random"
    rows, said = _search(demo_data, out, "random")
    _check_search(rows, said, out, "random")
    before = _samples(out)

    # A partial run: the driver had drawn 5 points when it stopped (the sixth never existed).
    kept = [s["name"] for s in before[:5]]
    mtimes = _mtimes(out, kept)
    record = json.loads((out / "search.json").read_text())
    (out / "search.json").write_text(json.dumps(record | {"samples": before[:5]}))
    shutil.rmtree(out / "trials" / before[5]["name"])
    rows, _ = _search(demo_data, out, "random", resume=True)
    assert _mtimes(out, kept) == mtimes  # finished points: neither drawn again nor retrained
    assert _samples(out) == before  # the same seed draws the same points: the sixth is the same as before
    assert all(r["status"] == "TERMINATED" for r in rows.values()) and sorted(rows) == sorted(s["name"] for s in before)


def test_optuna_search_then_resume_keeps_drawn_points(local_ray, demo_data, tmp_path):
    out = tmp_path / "optuna"
    rows, said = _search(demo_data, out, "optuna")
    _check_search(rows, said, out, "optuna")
    before = _samples(out)

    # The driver died with 5 points drawn: s000–s003 finished, s004 drawn but unfinished, s005 never drawn.
    kept = [s["name"] for s in before[:4]]
    mtimes = _mtimes(out, kept)
    record = json.loads((out / "search.json").read_text())
    (out / "search.json").write_text(json.dumps(record | {"samples": before[:5]}))
    (out / "trials" / before[4]["name"] / "results.json").unlink()
    shutil.rmtree(out / "trials" / before[5]["name"])
    rows, _ = _search(demo_data, out, "optuna", resume=True)
    after = _samples(out)
    assert after[:5] == before[:5] and len(after) == 6  # drawn points keep their values and names; one new draw
    assert _mtimes(out, kept) == mtimes
    assert (out / "trials" / before[4]["name"] / "results.json").exists()
    assert sorted(rows) == sorted(s["name"] for s in after) and all(r["status"] == "TERMINATED" for r in rows.values())
    assert 1e-4 <= after[5]["values"]["loss.lam"] <= 1 and 1e-3 <= after[5]["values"]["train.lr"] <= 1e-2


def test_asha_grid_stops_trials_and_never_chooses_them(local_ray, demo_data, tmp_path):
    """ASHA (grace 1 epoch, factor 2, 2 epochs: one rung, after epoch 1) over trials that run one at a
    time in grid order: the lr 3e-3 trials come first and set the rung; the lr 1e-9 trials barely move
    from their initialisation, so they score below both at the rung and must be stopped."""
    out = tmp_path / "asha"
    grid = "sweep.grid={train.lr: [3.0e-3, 1.0e-9], loss.lam: [0.0, 0.1]}"
    rows, said = _sweep(demo_data, out, "train.epochs=2", grid, "sweep.scheduler=asha", "sweep.asha_grace_period=1", "sweep.asha_reduction_factor=2", "sweep.max_concurrent_trials=1")
    assert any("unfused" in s and "sweep.scheduler=asha" in s for s in said), said
    stopped = {n: r for n, r in rows.items() if r["status"] == "STOPPED_EARLY"}
    assert {"lam=0.0_lr=1e-09", "lam=0.1_lr=1e-09"} <= set(stopped), rows
    assert rows["lam=0.0_lr=0.003"]["status"] == "TERMINATED" and rows["lam=0.0_lr=0.003"]["epochs"] == 2
    for name, row in stopped.items():
        assert row["epochs"] == 1 and row["best_epoch"] == 0 and 0 <= row["test_auc"] <= 1
        record = json.loads((out / "trials" / name / "stopped.json").read_text())
        assert record["stopped_early"] and record["epochs"] == row["epochs"] and record["best_epoch"] == row["best_epoch"]
        assert not (out / "trials" / name / "results.json").exists()
    summary = read_csv(str(out / "summary.csv"))
    chosen = [s for s in summary if s["chosen"]]
    assert chosen and all(s["stopped_early"] == 0 for s in chosen)
    for s in chosen:  # every trial behind a chosen λ reached the final epoch
        behind = [r for r in rows.values() if r["loss.lam"] == s["loss.lam"] and r["train.lr"] == s["train.lr"]]
        assert behind and all(r["status"] == "TERMINATED" and r["epochs"] == 2 for r in behind)
    assert sum(s["stopped_early"] for s in summary) == len(stopped)
    text = (out / "summary.md").read_text()
    assert "stopped early" in text
    report = (out / "report.md").read_text()
    assert "STOPPED_EARLY" in report and "stopped_early" in report  # the trials table and the trial count
