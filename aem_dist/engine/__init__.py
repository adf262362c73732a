"""Ray-free training engine: the loop, evaluation and metrics, checkpoint state."""

from .loop import EpochReport, FitResult, fit

__all__ = ["EpochReport", "FitResult", "fit"]
