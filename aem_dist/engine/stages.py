"""What a model needs before its run trains, beyond its own init: ``model_init(cfg, run_dir, ...)``.

Called by a run (``engine.local.run_local``, the Ray worker) and handed to ``fit(model_init=...)``,
which loads the tensors into the freshly built model (a resumed run then overrides them from its
checkpoint). A model with such a stage registers it under its ``model.name`` with :func:`stage`; this
module imports none of them (the engine package imports :mod:`.ibmil`, which registers itself):

* IBMIL (stage 2): the confounder dictionary, training stage 1 first when needed
  (:mod:`aem_dist.engine.ibmil`);
* MHIM-MIL with ``model.mhim_teacher_init``: the teacher (and, per ``model.mhim_student_init``, the
  student's embedding or all of it) from a trained baseline checkpoint — the official recipe's
  ``--teacher_init`` / ``--init_stu_type``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import storage
from ..config import Config
from ..storage import StorageOptions
from .checkpoint import load_dir
from .dist import DistContext

Stage = Callable[..., "dict[str, torch.Tensor] | None"]  # (cfg, run_dir, options, ctx)
STAGES: dict[str, Stage] = {}  # model.name → what it needs before training


def stage(name: str) -> Callable[[Stage], Stage]:
    """Register ``fn(cfg, run_dir, options, ctx) -> tensors | None`` as what model ``name`` needs before it trains."""

    def deco(fn: Stage) -> Stage:
        STAGES[name] = fn
        return fn

    return deco


@stage("mhim")
def mhim_init(cfg: Config, run_dir: str | None = None, options: StorageOptions | None = None, ctx: DistContext | None = None) -> dict[str, torch.Tensor] | None:
    """Teacher buffers (and student weights) from the baseline checkpoint ``model.mhim_teacher_init`` (None: unset).

    Raises ValueError when that checkpoint is not of an ``mhim`` model.
    """
    folder = cfg.model.mhim_teacher_init
    if not folder:
        return None
    state = load_dir(folder, options)
    if state.get("model_meta", {}).get("name") != "mhim":
        name = state.get("model_meta", {}).get("name")
        raise ValueError(f"model.mhim_teacher_init: {storage.redact(folder, options)} holds a {name!r} checkpoint, not an mhim baseline")
    weights = {k: v for k, v in state["model"].items() if not k.startswith("teacher.") and k != "progress"}
    init = {f"teacher.{k.removeprefix('encoder.').replace('.', '__')}": v for k, v in weights.items() if k.startswith("encoder.")}
    if cfg.model.mhim_student_init == "fc":
        init |= {k: v for k, v in weights.items() if k.startswith("encoder.embed.")}
    elif cfg.model.mhim_student_init == "all":
        init |= weights
    return init


def model_init(cfg: Config, run_dir: str | None, options: StorageOptions | None = None, ctx: DistContext | None = None) -> dict[str, torch.Tensor] | None:
    """Tensors to load into the model before training, or None (most models)."""
    fn = STAGES.get(cfg.model.name)
    return fn(cfg, run_dir, options, ctx) if fn is not None else None
