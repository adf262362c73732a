"""Accuracy parity: train.precision bf16 vs fp32, single runs and populations, 5 seeds per dataset.

    PYTHONPATH=$PWD python bench/bench_parity.py --json parity.json
    PYTHONPATH=$PWD python bench/bench_parity.py --epochs 3 --wsi-scale 0.25   # reduced (say so when quoting it)

Datasets: ``demo`` with configs/demo.yaml; ``mil-small`` and ``wsi-small`` (``--wsi-scale``) with
configs/camelyon16.yaml (ABMIL, lr 1e-4, one bag per step), ``--epochs`` each (default: the config's).
For each seed 0..4: a single run at fp32 and at bf16; and the 5 seeds as one population (members
differ in ``train.seed`` = init, one data order: ``train.data_seed=0``) at fp32 and at bf16. Printed:
test AUC / F1 mean ± sd over seeds per precision, and the largest per-seed |bf16 − fp32|.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def datasets(work: Path, wsi_scale: float) -> dict[str, tuple[str, str]]:
    from aem_dist.data.synthetic import get_spec, write_synthetic

    out = {}
    for preset, config, scale in (("demo", "demo", 1.0), ("mil-small", "camelyon16", 1.0), ("wsi-small", "camelyon16", wsi_scale)):
        root = work / preset
        write_synthetic(get_spec(preset, scale=scale), str(root), seed=0, progress=False)
        out[preset] = (str(root), config)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: each config's)")
    ap.add_argument("--wsi-scale", type=float, default=0.25)
    ap.add_argument("--presets", default="demo,mil-small,wsi-small")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from aem_dist.config import load_config
    from aem_dist.engine.loop import fit, fit_members

    work = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    data = datasets(work, args.wsi_scale)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "seeds": args.seeds, "epochs": args.epochs, "wsi_scale": args.wsi_scale, "rows": []}
    for preset in args.presets.split(","):
        root, config = data[preset]
        for mode in ("single", "population"):
            res: dict[str, list[dict]] = {}
            t0 = time.perf_counter()
            for precision in ("fp32", "bf16"):
                base = [f"data.root={root}", "train.progress=false", f"train.precision={precision}"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
                cfgs = [load_config(config, base + [f"train.seed={s}"] + (["train.data_seed=0"] if mode == "population" else [])) for s in range(args.seeds)]
                runs = fit_members(cfgs) if mode == "population" else [fit(c) for c in cfgs]
                res[precision] = [r.test for r in runs]
            row = {"preset": preset, "mode": mode, "wall_s": time.perf_counter() - t0}
            for key in ("auc", "f1"):
                for precision in ("fp32", "bf16"):
                    v = np.array([t[key] for t in res[precision]])
                    row[f"{precision}_{key}"] = [float(v.mean()), float(v.std())]
                row[f"max_diff_{key}"] = float(max(abs(a[key] - b[key]) for a, b in zip(res["fp32"], res["bf16"])))
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{'dataset':<10} {'runs':<10} {'fp32 AUC':>14} {'bf16 AUC':>14} {'max |dAUC|':>10} {'fp32 F1':>14} {'bf16 F1':>14} {'max |dF1|':>9}")
    for r in out["rows"]:
        f = lambda k: f"{r[k][0]:.3f} ± {r[k][1]:.3f}"  # noqa: E731
        print(f"{r['preset']:<10} {r['mode']:<10} {f('fp32_auc'):>14} {f('bf16_auc'):>14} {r['max_diff_auc']:>10.3f} {f('fp32_f1'):>14} {f('bf16_f1'):>14} "
              f"{r['max_diff_f1']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
