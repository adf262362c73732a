"""Ray wiring: Ray Train TorchTrainer runs, Ray Tune sweeps, resume, and Ray environment hygiene.

The only package (besides observe callbacks) that imports ray — and only inside the functions that
need it, so the in-process path (``scaling.num_workers: 0``) never starts Ray.
"""
