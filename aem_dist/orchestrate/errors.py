"""Errors the Ray layer raises for users (kept import-light: no ray here)."""


class SweepError(RuntimeError):
    """The sweep cannot start or finish as asked (the message says why and what to do)."""


class TrainingFailed(RuntimeError):
    """The run ended without results (every restart allowed by run.max_failures was used)."""


class PreflightError(RuntimeError):
    """The run would fail once started (unreadable dataset, unknown model, unwritable output, local paths
    on a multi-node cluster, resources no node has); found before any trial is scheduled."""
