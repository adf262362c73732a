"""Stress of many short one-worker Ray Train trials (issue 26): N CLI sweeps of P grid points, each trial its own
TorchTrainer (sweep.population=off), 2 epochs; counts the trials that finished and the sweeps that did not end.

    python -m tests.orchestrate.stress_sweeps --data DEMO --sweeps 5 --points 8 [--late-relay] [--timeout-s 900]

``--late-relay`` runs each sweep under tests/orchestrate/late_relay.py (the last epoch's Tune relay held until
the trial function returned from fit()). Not part of `make test` (minutes); its counts go into the issue's note.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def one_sweep(data: str, out: Path, points: int, late_relay: bool, timeout_s: float) -> tuple[str, int, float]:
    """('ok' | 'error' | 'hung', trials finished, seconds)."""
    module = "tests.orchestrate.late_relay" if late_relay else "aem_dist"
    lams = ", ".join(str(round(0.01 * k, 2)) for k in range(points))
    cmd = [sys.executable, "-m", module, "sweep", "--config", "demo", "--out", str(out), "--set", f"data.root={data}", "--set", "scaling.num_workers=1",
           "--set", "train.epochs=2", "--set", "train.progress=false", "--set", "metrics.port=0", "--set", "metrics.grace_s=0",
           "--set", "sweep.report=false", "--set", "sweep.population=off", "--set", f"sweep.grid={{loss.lam: [{lams}]}}"]
    private_tmp = tempfile.mkdtemp(prefix="aems-", dir="/tmp")
    env = {**os.environ, "TMPDIR": private_tmp, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            state = "ok" if proc.wait(timeout=timeout_s) == 0 else "error"
        except subprocess.TimeoutExpired:
            state = "hung"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            from tests.fixtures.ray_cluster import _kill_leftovers

            _kill_leftovers(private_tmp)
    finished = len(list(out.glob("trials/*/results.json")))
    if (out / "trials.csv").exists():
        with open(out / "trials.csv") as f:
            finished = sum(r["status"] == "TERMINATED" for r in csv.DictReader(f))
    return state, finished, time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a dataset folder (aem-dist synth --preset demo)")
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--late-relay", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="folder for the sweeps (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="aem-stress-"))
    root.mkdir(parents=True, exist_ok=True)
    totals = {"ok": 0, "error": 0, "hung": 0}
    trials = 0
    for k in range(args.sweeps):
        state, finished, seconds = one_sweep(os.path.abspath(args.data), root / f"sweep{k}", args.points, args.late_relay, args.timeout_s)
        totals[state] += 1
        trials += finished
        print(f"sweep {k}: {state}, {finished}/{args.points} trials finished, {seconds:.0f} s", flush=True)
    print(f"{args.sweeps} sweeps x {args.points} one-worker trials{' (late relay)' if args.late_relay else ''}: "
          f"{totals['ok']} ok, {totals['error']} error, {totals['hung']} hung; {trials}/{args.sweeps * args.points} trials finished; logs in {root}")


if __name__ == "__main__":
    main()
