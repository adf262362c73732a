"""Core commands: synth, train, demo, config."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import app, run_guarded, run_log

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="YAML config file, or a packaged config name: demo, demo-search, demo-asha, camelyon16, "
    "camelyon17, lbc.")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster to join (default: RAY_ADDRESS, else a private local Ray started for this command).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Dotted override, repeatable: --set loss.lam=0.1 --set train.epochs=5.")]


@app.command()
def synth(
    out: Annotated[str, typer.Option(help="Dataset folder or URL to write (path, file://, s3://bucket/prefix).")],
    preset: Annotated[str, typer.Option(help="Preset: demo (seconds), mil-small (~10 instances/bag), wsi-small (median ~1 000, D=384), wsi-c16 "
        "(CAMELYON16-shaped, median ~8 000, heterogeneous tumour with mimics), c16-mini (wsi-c16's tumour model in seconds).")] = "demo",
    seed: Annotated[int, typer.Option(help="Seed: the same seed rebuilds the same dataset bit for bit.")] = 0,
    scale: Annotated[float, typer.Option(help="Multiply the preset's bag counts (bag sizes keep their law).")] = 1.0,
    size_scale: Annotated[float, typer.Option(help="Multiply the preset's bag sizes (median, min and max instances; same spread), e.g. 0.125 runs wsi-c16 on a "
        "CPU.")] = 1.0,
    shard_mb: Annotated[int, typer.Option(help="Target shard size in MiB.")] = 256,
    folds: Annotated[Optional[int], typer.Option(help="Also record K cross-validation folds (as `aem-dist splits OUT --folds K`).")] = None,
    val_frac: Annotated[float, typer.Option(help="With --folds: share of each fold's non-test bags drawn for validation.")] = 0.1,
    stratify: Annotated[bool, typer.Option("--stratify/--no-stratify", help="With --folds: stratify folds by class.")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a generator knob, repeatable: --set mimic_rate=0.5 --set "
        "'subtype_strength=[6, 2]' (docs/data.md, \"Synthetic data\"; recorded in the manifest).")] = None,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Fit the instance-level linear probe (tumour vs normal) and record its AUC in the "
        "manifest.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already at --out (its manifest is removed first, so an interrupted "
        "rewrite is visibly no dataset). Without it an existing dataset is refused.")] = False,
) -> None:
    """Generate a synthetic WSI-like dataset (shards + manifest) from a preset."""

    def body() -> None:
        from ..data.synthetic import get_spec, parse_knobs, write_synthetic
        from ..storage import StorageOptions, redact

        options = StorageOptions.from_config()
        knobs = parse_knobs(set_ or [])
        spec = get_spec(preset, scale, size_scale, knobs)
        manifest = write_synthetic(spec, out, seed, shard_bytes=shard_mb << 20, options=options, probe=probe, knobs=knobs, overwrite=overwrite)
        if folds is not None:
            from ..data.folds import record_folds

            manifest = record_folds(out, folds, val_frac=val_frac, seed=seed, stratify=stratify, options=options)
        counts = ", ".join(f"{s}: {e.n_bags} bags / {e.n_instances:,} instances" for s, e in manifest.splits.items())
        typer.echo(f"wrote {preset} (seed {seed}) to {redact(out, options)}: {counts}")
        p = manifest.source.get("probe") or {}
        if p.get("auc") is not None:
            subs = ", ".join(f"{a:.3f}" for a in p["auc_by_subtype"] if a is not None)
            mimic = f"; mimics vs normal {p['mimic_auc']:.3f}" if p.get("mimic_auc") is not None else ""
            typer.echo(f"instance-level linear probe (tumour vs normal, test instances): AUC {p['auc']:.3f}; per sub-prototype {subs}{mimic}")

    run_guarded(body)


@app.command()
def train(
    config: ConfigOpt,
    out: Annotated[str, typer.Option(help="Run folder or URL: results.json, run.json, best/state.pt and checkpoints go here. Re-running with the same --out "
        "and config resumes; a different config is refused.")],
    set_: SetOpt = None,
    address: AddressOpt = None,
    force_new: Annotated[bool, typer.Option("--force-new", help="Start over in --out: remove the checkpoints, best state and results a previous run left there "
        "(also when its config differs).")] = False,
) -> None:
    """Train one model: in this process (scaling.num_workers 0) or as a Ray Train DDP run.

    Writes OUT/results.json (best epoch by train.select_metric — default val AUC + F1 —, its val/test
    metrics, per-epoch history, the config that produced them),
    OUT/run.json (config, versions, commit, data hash) and OUT/best/state.pt; serves live metrics
    on metrics.host:metrics.port while it runs.
    """

    def body() -> None:
        from ..config import load_config
        from ..orchestrate.train import train_run

        from ..orchestrate.preflight import check_config

        cfg = load_config(config, set_)
        check_config(cfg, out, sweep=False)  # a wrong dataset, model or output fails here, before Ray starts
        with run_log(out, "train", cfg):
            result = train_run(cfg, out, address=address, announce=typer.echo, force_new=force_new)
        _print_result(result)

    run_guarded(body)


def _print_result(result: dict) -> None:
    def fmt(d: dict) -> str:
        return "  ".join(f"{k} {v:.4f}" for k, v in d.items() if k in ("auc", "f1", "acc", "attn_entropy") and isinstance(v, float))

    typer.echo(f"best epoch {result['best_epoch']}: val {fmt(result['val'])}")
    typer.echo(f"{'':>{len(str(result['best_epoch'])) + 12}}test {fmt(result['test'])}")


config_app = typer.Typer(help="Inspect configuration: resolved values and every key's meaning.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file or packaged name (default: built-in "
    "defaults).")] = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration as YAML (secrets redacted)."""
    from ..config import dump_yaml, load_config

    run_guarded(lambda: typer.echo(dump_yaml(load_config(config, set_)), nl=False))


@config_app.command("keys")
def config_keys() -> None:
    """List every config key with its default and description."""
    from ..config import describe_keys

    for key, default, text in describe_keys():
        typer.echo(f"{key} = {default!r}\n    {text}")


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Folder for the demo's data, sweep results, report and plots.")] = "demo-out",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic dataset.")] = 0,
    set_: SetOpt = None,
) -> None:
    """The whole path on embedded defaults: synthetic `demo` data → WebDataset shards → a Ray Tune sweep
    (2 seeds × 3 λ) of Ray Train runs → per-λ summary table, report.md with plots; live Prometheus
    metrics while it runs. Takes a few minutes on a laptop; re-running resumes."""

    def body() -> None:
        from .. import storage
        from ..config import load_config
        from ..data.synthetic import get_spec, write_synthetic
        from ..orchestrate.preflight import check_config
        from ..orchestrate.ray_env import ray_session
        from ..orchestrate.sweep import run_sweep

        data, sweep_out = storage.join(out, "data"), storage.join(out, "sweep")
        if not storage.exists(storage.join(data, "manifest.json")):
            write_synthetic(get_spec("demo"), data, seed, overwrite=True)  # its own folder; an interrupted write is redone
        cfg = load_config("demo", [f"data.root={data}", *(set_ or [])])
        plan = check_config(cfg, sweep_out, sweep=True)
        typer.echo(f"demo data: {data}; sweeping {cfg.sweep.grid} with {cfg.scaling.num_workers} Ray Train worker(s) per trial")
        with run_log(sweep_out, "demo", cfg), ray_session(None, cfg):
            run_sweep(cfg, sweep_out, resume=True, announce=typer.echo, plan=plan)
        typer.echo(storage.read_bytes(storage.join(sweep_out, "summary.md")).decode())
        typer.echo(f"results: {sweep_out}/trials.csv, summary.csv, summary.md; report with plots: {sweep_out}/report.md")

    run_guarded(body)
