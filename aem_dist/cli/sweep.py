"""Ray commands: sweep."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app, run_guarded, run_log
from .core import AddressOpt, ConfigOpt, SetOpt


@app.command()
def sweep(
    config: ConfigOpt,
    out: Annotated[str, typer.Option(help="Output folder or URL (path or s3://bucket/prefix): trials.csv, summary.csv/md, run.json, trials/<trial>/.")],
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the sweep already in --out: finished (and early-stopped) trials are kept, the rest run "
        "(from their last checkpoint); a search keeps the points it drew.")] = False,
    address: AddressOpt = None,
) -> None:
    """Run the sweep.grid (e.g. train.seed × loss.lam) with Ray Tune: one Ray Train run per trial, then the per-λ summary.

    Beyond the grid: sweep.search=random|optuna draws sweep.num_samples points from sweep.space (e.g. {loss.lam: {loguniform: [1.0e-4, 1]}});
    search.json records them and --resume keeps them.

    Early stopping: sweep.scheduler=asha (sweep.asha_grace_period, sweep.asha_reduction_factor); stopped trials are STOPPED_EARLY in trials.csv
    and never give the chosen λ. Every key: `aem-dist config keys`.

    Example: aem-dist sweep --config configs/camelyon16.yaml --set data.root=s3://bucket/c16 --out s3://bucket/c16-sweep
    """

    def body() -> None:
        from ..config import load_config
        from ..orchestrate.preflight import check_config
        from ..orchestrate.ray_env import ray_session
        from ..orchestrate.sweep import run_sweep
        from ..storage import StorageOptions, join, read_bytes

        cfg = load_config(config, set_)
        plan = check_config(cfg, out, sweep=True)  # bad grid, model, dataset or output: fails here, before Ray starts
        with run_log(out, "sweep", cfg), ray_session(address, cfg):
            run_sweep(cfg, out, resume=resume, announce=typer.echo, plan=plan)
        typer.echo(read_bytes(join(out, "summary.md"), StorageOptions.from_config(cfg.storage)).decode())

    run_guarded(body)
