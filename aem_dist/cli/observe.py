"""Observe commands: report, predict, heatmap."""

from __future__ import annotations

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
    run: Annotated[str, typer.Option(help="Run (or trial) folder holding best/state.pt; path, file:// or s3://.")],
    out: Annotated[str, typer.Option(help="Zarr store to write (replaced if present); path, file:// or s3://.")],
    data: Annotated[Optional[str], typer.Option(help="Dataset folder or URL (default: data.root of the run's config).")] = None,
    split: Annotated[str, typer.Option(help="Split(s) to predict, comma-separated, e.g. test or val,test.")] = "test",
    max_instances: Annotated[int, typer.Option(help="Instances per forward pass (bags are packed, never cut; a larger bag runs alone).")] = 65_536,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint: best (the selected epoch), last (the latest kept) or epoch-N (if still kept).")] = "best",
) -> None:
    """Per-bag predictions and per-instance attention with coords → a zarr store (layout: docs/observability.md)."""

    def body() -> None:
        from ..config import DataConfig
        from ..observe.attention import load_run_model, predict_split, write_attention
        from ..storage import StorageOptions, redact

        options = StorageOptions.from_config()
        model = load_run_model(run, options, checkpoint)
        data_cfg = DataConfig.model_validate(model.config["data"]) if "data" in model.config else DataConfig()
        root = data or data_cfg.root
        bags = []
        for s in [p.strip() for p in split.split(",") if p.strip()]:
            bags += predict_split(model, root, s, options=options, data=data_cfg, max_instances=max_instances, device=device)
        attrs = {"run": redact(run, options), "data": redact(root, options), "model": model.meta.get("name"), "checkpoint_epoch": model.epoch,
            "checkpoint": checkpoint, "fold": data_cfg.fold}
        meta = write_attention(out, bags, class_names=model.meta.get("class_names") or [], attrs=attrs, options=options)
        acc = sum(int(b.probs.argmax() == b.label) for b in bags) / len(bags)
        typer.echo(f"wrote {meta['n_bags']} bags / {meta['n_instances']:,} instances ({', '.join(meta['splits'])}; accuracy {acc:.3f}) to "
            f"{redact(out, options)}")

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
