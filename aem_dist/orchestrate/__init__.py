"""Ray wiring: Ray Train TorchTrainer runs, Ray Tune sweeps, resume, and Ray environment hygiene.

In floors, each importing only those below it (checked by ``.importlinter``): ``trials`` (names, report keys,
file names, the decoder of a trial's population) and ``errors``; ``resources`` (what a run asks of Ray) and
``ray_env`` (the one ``ray.init``); ``plan`` (the :class:`~.plan.SweepPlan`) and ``worker`` (the per-worker
function, the TorchTrainer); ``preflight``, ``search``, ``resume``; ``sweep``; ``train``.

The only package (besides observe callbacks) that imports ray. ``worker`` and ``search``, which only run under
Ray, import it at module top; every other module only inside the functions that need it, and the planning
floors (``trials``, ``resources``, ``plan``) never — so the in-process path (``scaling.num_workers: 0``) and
the checks before a run never start Ray.
"""
