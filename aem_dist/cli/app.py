"""The typer application and the error handling shared by every command."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Iterator

import typer

app = typer.Typer(
    name="aem-dist",
    help=(
        "Distributed AEM (Attention Entropy Maximization) training for attention-based MIL on whole-slide-image feature bags.\n\n"
        "Typical flow: `aem-dist synth` or `aem-dist ingest` (make a dataset) → `aem-dist train` (one run) or "
        "`aem-dist sweep` (seeds × λ grid on Ray) → `aem-dist report`. `aem-dist demo` runs it all on a tiny synthetic dataset."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def user_errors() -> tuple[type[BaseException], ...]:
    from ..config import ConfigError
    from ..data.manifest import ManifestError
    from ..data.schema import BadSampleError
    from ..data.synthetic import SpecError
    from ..engine.runrecord import RunConfigMismatch
    from ..observe.identity import DataChanged
    from ..orchestrate.errors import PreflightError, SweepError, TrainingFailed
    from ..storage import StorageError

    return (
        DataChanged,
        ConfigError,
        ManifestError,
        BadSampleError,
        SpecError,
        StorageError,
        FileNotFoundError,
        SweepError,
        TrainingFailed,
        RunConfigMismatch,
        PreflightError,
    )


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("AEM_DEBUG") else logging.INFO
    from ..storage import RedactingFilter

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # every logger's records pass here: redact them all
        handler.addFilter(RedactingFilter())


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body; known user errors exit 2 with a redacted one-line message."""
    from ..storage import redact

    from ..orchestrate.interrupt import EXIT_CODE, SweepInterrupted

    try:
        return fn()
    except SweepInterrupted as err:
        typer.secho(redact(err), err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_CODE) from None
    except KeyboardInterrupt:
        typer.secho("interrupted (Ctrl-C); the same command continues from the last checkpoint", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_CODE) from None
    except user_errors() as err:
        typer.secho(f"error: {redact(err)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def run_log(out: str, command: str, cfg: Any = None) -> Iterator[None]:
    """The command's run log under ``out/logs/`` (see :mod:`aem_dist.observe.console`), announced first:
    the console leaves Ray's noise out, the log keeps every line."""
    from ..observe.console import RunLog
    from ..storage import StorageOptions

    options = StorageOptions.from_config(cfg.storage) if cfg is not None else None
    with RunLog(out, command, options) as runlog:
        typer.echo(f"log: {runlog.shown}")
        yield


def main() -> None:
    setup_logging()
    app()
