"""Data commands: ingest (a source format → dataset), verify (a dataset against its manifest), splits (cross-validation folds)."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Optional

import typer

from ..data.sources import FORMATS
from .app import app, run_guarded

FORMAT_HELP = "Input format: " + ", ".join(f"{name} ({f.help})" for name, f in FORMATS.items()) + "."


def _guarded(fn: Callable[[], Any]) -> Any:
    """run_guarded, plus malformed source files as a one-line user error (exit 2)."""
    from ..data.sources import SourceError
    from ..storage import redact

    def body() -> Any:
        try:
            return fn()
        except SourceError as err:
            typer.secho(f"error: {redact(err)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return run_guarded(body)


@app.command()
def ingest(
    format: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP)],
    src: Annotated[str, typer.Option(help="Local folder or file holding the features.")],
    out: Annotated[str, typer.Option(help="Dataset folder or URL to write (path, file://, s3://bucket/prefix).")],
    labels: Annotated[Optional[str], typer.Option(help="CSV with header slide_id,label[,split]. Required unless the format carries labels (acmil, zarr, "
        "mil-csv) or --no-labels.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated class names in index order (default: sorted labels; integers numerically).")] = None,
    val_frac: Annotated[float, typer.Option(help="Validation fraction of the stratified split (used when the CSV has no split column).")] = 0.1,
    test_frac: Annotated[float, typer.Option(help="Test fraction of the stratified split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split and of the bag order inside shards.")] = 0,
    shard_mb: Annotated[int, typer.Option(help="Target shard size in MiB.")] = 256,
    on_bad: Annotated[str, typer.Option(help="error: stop at the first bad bag (NaN/Inf, 0 instances, wrong dim, missing features); skip: leave it out and "
        "count it.")] = "error",
    max_instances_per_bag: Annotated[int, typer.Option(help="Largest bag a source file may declare (instances); larger ones are refused before they are read "
        "(data.max_instances_per_bag).")] = 1_000_000,
    max_dim: Annotated[int, typer.Option(help="Largest feature dim a source file may declare (data.max_dim).")] = 16_384,
    case_column: Annotated[Optional[str], typer.Option(help="Labels CSV column grouping slides by case/patient (default: case_id when present); a case's "
        "slides always share one split.")] = None,
    label_map: Annotated[Optional[str], typer.Option(help="Map raw labels to class names first, e.g. 'Tumor=tumor,ITC=tumor'. Without it, labels differing "
        "only by case/whitespace are an error.")] = None,
    dim: Annotated[Optional[int], typer.Option(help="Feature dim of the dataset (default: the dim most slides' headers agree on; the others are reported as "
        "bad).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="With --on-bad error: report every bad slide in one pass instead of stopping at the first.")] = False,
    folds: Annotated[Optional[int], typer.Option(help="Also record K cross-validation folds (as `aem-dist splits OUT --folds K --val-frac VAL_FRAC --seed "
        "SEED`).")] = None,
    stratify: Annotated[bool, typer.Option("--stratify/--no-stratify", help="With --folds: stratify folds by class.")] = True,
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Slides without labels, to predict on: every slide of the source goes into the test "
        "split unlabelled (no --labels; --classes optional). `aem-dist predict` on it writes predictions.csv and no metrics.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already at --out (its manifest is removed first, so an interrupted "
        "rewrite is visibly no dataset). Without it an existing dataset is refused.")] = False,
) -> None:
    """Convert extracted features (CLAM/TRIDENT, .pt, AEM/ACMIL HDF5, zarr, MIL CSV) into a dataset."""

    def body() -> None:
        from ..data.ingest import ingest as run_ingest
        from ..data.limits import Limits
        from ..data.sources.labels import parse_label_map
        from ..storage import StorageOptions, probe, redact

        if on_bad not in ("error", "skip"):
            raise typer.BadParameter("--on-bad must be 'error' or 'skip'")
        if no_labels and folds is not None:
            raise typer.BadParameter("--folds needs labels (folds are for training); --no-labels makes a dataset to predict on")
        options = StorageOptions.from_config()
        probe(out, options, write=True)  # wrong endpoint or key: fail now, not after the first shard
        names = [c.strip() for c in classes.split(",")] if classes else None
        result = run_ingest(format, src, out, labels_csv=labels, classes=names, val_frac=val_frac, test_frac=test_frac, seed=seed, shard_bytes=shard_mb << 20,
            on_bad=on_bad, options=options,
                            case_column=case_column, label_map=parse_label_map(label_map), dim=dim, report_all=all_, no_labels=no_labels,
                            limits=Limits(max_instances_per_bag, max_dim), overwrite=overwrite)
        m = result.manifest
        if folds is not None:
            from ..data.folds import record_folds

            m = record_folds(out, folds, val_frac=val_frac, seed=seed, stratify=stratify, options=options)
        counts = ", ".join(f"{s}: {e.n_bags} bags" for s, e in m.splits.items())
        classes_text = f"classes {m.class_names}" + (" (no labels)" if no_labels else "")
        typer.echo(f"wrote {redact(out, options)}: dim {m.dim}, {classes_text}; {counts}")
        if result.skipped:
            typer.echo(f"skipped: {dict(result.skipped)}")
        if result.unlabelled:
            typer.echo(f"left out {result.unlabelled} slide(s) without a label")

    _guarded(body)


@app.command()
def verify(
    url: Annotated[str, typer.Argument(help="Dataset folder or URL (path, file://, s3://bucket/prefix).")],
    all_: Annotated[bool, typer.Option("--all", help="Print every problem (default: the first 20 per shard).")] = False,
) -> None:
    """Check a dataset against its manifest (bytes, sha256, counts, keys, safe decoding).

    Exit 0: OK; 1: problems found (all listed); 2: the dataset cannot be read (no or invalid manifest).

    Every shard is read once; every bag is decoded with the loaders' safe decoder (nothing is unpickled).
    """

    def body() -> None:
        from ..data.verify import verify_dataset
        from ..storage import StorageOptions

        report = verify_dataset(url, StorageOptions.from_config())
        typer.echo(report.text(limit=None if all_ else 20))
        if not report.readable:
            raise typer.Exit(2)
        if not report.ok:
            raise typer.Exit(1)

    _guarded(body)


def folds_text(manifest: Any) -> str:
    """One line per fold: bags per split and per class."""
    f = manifest.folds
    label = {b.key: b.label for e in manifest.splits.values() for b in e.bags()}
    lines = []
    for i, fold in enumerate(f.folds):
        parts = []
        for split in ("train", "val", "test"):
            keys = getattr(fold, split)
            per_class = [sum(1 for k in keys if label[k] == c) for c in range(manifest.n_classes)]
            parts.append(f"{split} {len(keys)} {per_class}")
        lines.append(f"fold {i}: " + ", ".join(parts))
    return "\n".join(lines)


@app.command()
def splits(
    dataset: Annotated[str, typer.Argument(help="Dataset folder or URL (path, file://, s3://bucket/prefix).")],
    folds: Annotated[int, typer.Option(help="Number of cross-validation folds K (>= 2): every bag is in the test split of exactly one.")],
    val_frac: Annotated[float, typer.Option(help="Share of each fold's non-test bags (cases) drawn for validation (0: no validation split).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the fold assignment: the same seed gives the same folds.")] = 0,
    stratify: Annotated[bool, typer.Option("--stratify/--no-stratify", help="Stratify folds (and each fold's validation share) by class.")] = True,
) -> None:
    """Record K cross-validation folds in DATASET's manifest; train on one with --set data.fold=N.

    Shards are not rewritten: a fold only reassigns bags to train/val/test. A case's slides (the case
    column given to `ingest`) stay in one fold. The manifest is rewritten atomically; its fixed splits
    stay; folds recorded before are replaced.
    """

    def body() -> None:
        from ..data.folds import record_folds
        from ..storage import StorageOptions, redact

        options = StorageOptions.from_config()
        try:
            m = record_folds(dataset, folds, val_frac=val_frac, seed=seed, stratify=stratify, options=options)
        except ValueError as err:
            if type(err) is not ValueError:
                raise
            raise typer.BadParameter(str(err)) from None
        grouped = f", cases kept together by {m.folds.grouped_by!r}" if m.folds.grouped_by else ""
        typer.echo(f"recorded {folds} folds (seed {seed}, val {val_frac}, {'stratified' if stratify else 'unstratified'}{grouped}) in "
            f"{redact(dataset, options)}")
        typer.echo(folds_text(m))

    _guarded(body)
