"""Ray-free training engine: the loop, evaluation and metrics, checkpoint state."""

from . import ibmil  # noqa: F401  (registers IBMIL's stage 1 in .stages)
from .loop import EpochReport, FitResult, fit

__all__ = ["EpochReport", "FitResult", "fit"]
