"""Observability and results: Prometheus metrics, result tables, reports and plots, attention export."""
