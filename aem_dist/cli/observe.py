"""Observe commands: report, predict, export, heatmap."""

from __future__ import annotations

import json
from typing import Annotated, Any, Callable, Optional

import typer

from .app import app, run_guarded


def _guarded(fn: Callable[[], Any]) -> Any:
    """run_guarded plus this area's own user errors (bad store, unknown bag, mismatched data)."""
    from ..observe.attention import AttentionStoreError
    from ..storage import redact

    def body() -> Any:
        try:
            return fn()
        except (AttentionStoreError, KeyError, ValueError) as err:
            typer.secho(f"error: {redact(err.args[0] if isinstance(err, KeyError) and err.args else err)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return run_guarded(body)


@app.command()
def report(
    url: Annotated[str, typer.Argument(help="Sweep folder (trials.csv, summary.csv, trials/<trial>/...) or a train run folder; path, file:// or s3://.")],
    data: Annotated[Optional[str], typer.Option(help="Dataset for the attention-concentration plot (default: data.root from the sweep's run.json).")] = None,
    split: Annotated[str, typer.Option(help="Split the attention-concentration curves are computed on.")] = "test",
    progress: Annotated[bool, typer.Option(help="Progress bars while predicting with the trials' checkpoints.")] = True,
) -> None:
    """Write URL/report.md and URL/plots/*.png: λ sensitivity (Fig. 5), entropy vs AUC (Fig. 3), training curves (Fig. 8), attention concentration (Fig. 9),
    UMAP of test-bag embeddings with k-means V-measure (Fig. 11); with data.fold swept, summaries over folds × seeds."""

    def body() -> None:
        from ..observe.report import write_report
        from ..storage import StorageOptions, redact

        options = StorageOptions.from_config()
        rep = write_report(url, data=data, split=split, options=options, progress=progress)
        typer.echo(f"wrote {redact(rep.url, options)} with {len(rep.plots)} plots")
        for name, why in rep.skipped.items():
            typer.echo(f"  left out {name}: {why}")

    _guarded(body)


@app.command()
def predict(
    run: Annotated[str, typer.Option(help="Run (or trial) folder holding best/state.pt, a model file from `aem-dist export` (*.safetensors), "
                                          "or with --ensemble a sweep folder; path, file:// or s3://.")],
    out: Annotated[str, typer.Option(help="Zarr store to write: a new or empty location, or a store predict wrote before (replaced); "
                                          "path, file:// or s3://. predictions.csv goes next to it.")],
    data: Annotated[Optional[str], typer.Option(help="Dataset folder or URL (default: data.root of the run's config).")] = None,
    split: Annotated[str, typer.Option(help="Split(s) to predict, comma-separated, e.g. test or val,test.")] = "test",
    max_instances: Annotated[int, typer.Option(help="Instances per forward pass (bags are packed, never cut; a larger bag runs alone).")] = 65_536,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best (the selected epoch), last (the latest kept) or epoch-N (if still kept).")] = "best",
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble",
            help="--run is a sweep: predict with every trial (seeds, folds) of the λ it chose by validation and average their probabilities (and attention).",
        ),
    ] = False,
    csv_out: Annotated[Optional[str], typer.Option("--csv", help="Per-slide CSV to write (default: predictions.csv in the folder of --out).")] = None,
) -> None:
    """Per-bag predictions and per-instance attention with coords → a zarr store (layout: docs/observability.md),
    and predictions.csv: slide_id, case_id, split, label, one probability per class, predicted class.

    Unlabelled slides (`ingest --no-labels`) get predictions and no metrics. With --ensemble the sweep's
    chosen λ predicts as the mean of its trials' probabilities, which is how a sweep's result is used.
    """

    def body() -> None:
        from .. import storage
        from ..config import DataConfig
        from ..data.manifest import load_manifest
        from ..observe.attention import check_output, load_run_model, predict_split, write_attention
        from ..observe.predictions import accuracy_line, case_of, check_table_output, ensemble_members, predictions_csv
        from ..observe.predictions import ensemble as combine
        from ..storage import StorageOptions, redact

        options = StorageOptions.from_config()
        table = csv_out or storage.join(out.rstrip("/").rsplit("/", 1)[0] if "/" in out.rstrip("/") else ".", "predictions.csv")
        check_output(out, options)  # before any work: outputs never replace what predict did not write
        check_table_output(table, options)
        if ensemble:
            members, what = ensemble_members(run, options)
            models = [load_run_model(m, options, checkpoint) for m in members]
            typer.echo(f"ensemble of {what}")
        else:
            models = [load_model(run, options, checkpoint)]
        model = models[0]
        data_cfg = DataConfig.model_validate(model.config["data"]) if "data" in model.config else DataConfig()
        if len({(m.config.get("data") or {}).get("fold") for m in models}) > 1:  # members of several folds: the dataset's own splits
            data_cfg = data_cfg.model_copy(update={"fold": None})
        root = data or data_cfg.root
        bags = []
        for s in [p.strip() for p in split.split(",") if p.strip()]:
            per_member = [predict_split(m, root, s, options=options, data=data_cfg, max_instances=max_instances, device=device) for m in models]
            bags += combine(per_member) if len(models) > 1 else per_member[0]
        attrs = {
            "run": redact(run, options),
            "data": redact(root, options),
            "model": model.meta.get("name"),
            "checkpoint_epoch": model.epoch,
            "checkpoint": checkpoint,
            "fold": data_cfg.fold,
        }
        if ensemble:
            attrs["ensemble"] = [redact(m, options) for m in members]
        class_names = model.meta.get("class_names") or []
        meta = write_attention(out, bags, class_names=class_names, attrs=attrs, options=options)
        storage.atomic_write_text(table, predictions_csv(bags, class_names, case_of(load_manifest(root, options))), options)
        scored = accuracy_line(bags)
        scored = f"; {scored}" if scored else ""
        typer.echo(f"wrote {meta['n_bags']} bags / {meta['n_instances']:,} instances ({', '.join(meta['splits'])}{scored}) to {redact(out, options)}")
        typer.echo(f"per-slide predictions: {redact(table, options)}")

    _guarded(body)


def load_model(run: str, options, checkpoint: str = "best"):
    """A run (or trial) folder's checkpoint, or an `aem-dist export` file."""
    from ..observe.attention import load_run_model
    from ..observe.export import is_export, load_exported

    return load_exported(run, options) if is_export(run) else load_run_model(run, options, checkpoint)


@app.command()
def export(
    run: Annotated[str, typer.Option(help="Run (or trial) folder holding best/state.pt; path, file:// or s3://.")],
    out: Annotated[str, typer.Option(help="Model file to write, ending in .safetensors (path, file:// or s3://).")],
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best (the selected epoch), last or epoch-N.")] = "best",
) -> None:
    """Export a trained model as one safetensors file: weights, model config, class names and the run's config.

    The file is used without its run folder: `aem-dist predict --run model.safetensors --data NEW --out pred.zarr`,
    or `aem_dist.observe.export.load_exported(url)` in Python. Nothing in it is pickled.
    """

    def body() -> None:
        from ..observe.attention import load_run_model
        from ..observe.export import SUFFIX, export_model
        from ..storage import StorageOptions, redact

        if not out.endswith(SUFFIX):
            raise ValueError(f"--out {out!r} must end in {SUFFIX}")
        options = StorageOptions.from_config()
        model = load_run_model(run, options, checkpoint)
        meta = export_model(model, out, options)
        typer.echo(f"wrote {redact(out, options)}: {model.meta.get('name')} (epoch {meta['epoch']}), classes {', '.join(json.loads(meta['class_names']))}")

    _guarded(body)


@app.command()
def heatmap(
    attention: Annotated[str, typer.Option(help="Attention store written by `aem-dist predict`.")],
    out: Annotated[str, typer.Option(help="Folder (or URL) for one PNG per slide.")],
    bags: Annotated[Optional[list[str]], typer.Option("--bags", help="Slide ids or keys to render (repeatable; default: all).")] = None,
    scale: Annotated[str, typer.Option(help="Colour scale: rank (percentile within slide), linear (÷ max) or log (log10 attention×N).")] = "rank",
    limit: Annotated[Optional[int], typer.Option(help="Render at most this many slides.")] = None,
) -> None:
    """Render attention heatmaps (one PNG per slide; the ground-truth tumour mask alongside when the data has one)."""

    def body() -> None:
        from ..observe.heatmap import render_store
        from ..storage import StorageOptions, redact

        options = StorageOptions.from_config()
        written = render_store(attention, out, bags=bags, scale=scale, limit=limit, options=options)
        typer.echo(f"wrote {len(written)} heatmaps to {redact(out, options)}")

    _guarded(body)
