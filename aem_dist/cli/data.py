"""Data commands: ingest (a source format → dataset), verify (a dataset against its manifest)."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Optional

import typer

from .app import app, run_guarded


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
    format: Annotated[str, typer.Option("--format", "-f", help="Input format: clam | trident (folder of <slide>.h5 with features, coords), pt (folder of <slide>.pt), acmil (one HDF5: <slide>/feat, coords, attrs label), zarr (group per slide: features, coords, attrs label), mil-csv (rows: label, bag id, features…).")],
    src: Annotated[str, typer.Option(help="Local folder or file holding the features.")],
    out: Annotated[str, typer.Option(help="Dataset folder or URL to write (path, file://, s3://bucket/prefix).")],
    labels: Annotated[Optional[str], typer.Option(help="CSV with header slide_id,label[,split]. Required unless the format carries labels (acmil, zarr, mil-csv).")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Comma-separated class names in index order (default: sorted labels; integers numerically).")] = None,
    val_frac: Annotated[float, typer.Option(help="Validation fraction of the stratified split (used when the CSV has no split column).")] = 0.1,
    test_frac: Annotated[float, typer.Option(help="Test fraction of the stratified split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split and of the bag order inside shards.")] = 0,
    shard_mb: Annotated[int, typer.Option(help="Target shard size in MiB.")] = 256,
    on_bad: Annotated[str, typer.Option(help="error: stop at the first bad bag (NaN/Inf, 0 instances, wrong dim, missing features); skip: leave it out and count it.")] = "error",
    max_instances_per_bag: Annotated[int, typer.Option(help="Largest bag a source file may declare (instances); larger ones are refused before they are read (data.max_instances_per_bag).")] = 1_000_000,
    max_dim: Annotated[int, typer.Option(help="Largest feature dim a source file may declare (data.max_dim).")] = 16_384,
    case_column: Annotated[Optional[str], typer.Option(help="Labels CSV column grouping slides by case/patient (default: case_id when present); a case's slides always share one split.")] = None,
    label_map: Annotated[Optional[str], typer.Option(help="Map raw labels to class names first, e.g. 'Tumor=tumor,ITC=tumor'. Without it, labels differing only by case/whitespace are an error.")] = None,
    dim: Annotated[Optional[int], typer.Option(help="Feature dim of the dataset (default: the dim most slides' headers agree on; the others are reported as bad).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="With --on-bad error: report every bad slide in one pass instead of stopping at the first.")] = False,
) -> None:
    """Convert extracted features (CLAM/TRIDENT, .pt, AEM/ACMIL HDF5, zarr, MIL CSV) into a dataset."""

    def body() -> None:
        from ..data.ingest import ingest as run_ingest
        from ..data.limits import Limits
        from ..data.sources.labels import parse_label_map
        from ..storage import StorageOptions, probe, redact

        if on_bad not in ("error", "skip"):
            raise typer.BadParameter("--on-bad must be 'error' or 'skip'")
        options = StorageOptions.from_config()
        probe(out, options, write=True)  # wrong endpoint or key: fail now, not after the first shard
        names = [c.strip() for c in classes.split(",")] if classes else None
        result = run_ingest(format, src, out, labels_csv=labels, classes=names, val_frac=val_frac, test_frac=test_frac, seed=seed, shard_bytes=shard_mb << 20, on_bad=on_bad, options=options,
                            case_column=case_column, label_map=parse_label_map(label_map), dim=dim, report_all=all_,
                            limits=Limits(max_instances_per_bag, max_dim))
        m = result.manifest
        counts = ", ".join(f"{s}: {e.n_bags} bags" for s, e in m.splits.items())
        typer.echo(f"wrote {redact(out, options)}: dim {m.dim}, classes {m.class_names}; {counts}")
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
