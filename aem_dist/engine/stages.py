"""What a model needs before its run trains, beyond its own init: ``model_init(cfg, run_dir, ...)``.

Called by a run (``engine.local.run_local``, the Ray worker) and handed to ``fit(model_init=...)``,
which loads the tensors into the freshly built model (a resumed run then overrides them from its
checkpoint):

* IBMIL (stage 2): the confounder dictionary, training stage 1 first when needed
  (:mod:`aem_dist.engine.ibmil`);
* MHIM-MIL with ``model.mhim_teacher_init``: the teacher (and, per ``model.mhim_student_init``, the
  student's embedding or all of it) from a trained baseline checkpoint — the official recipe's
  ``--teacher_init`` / ``--init_stu_type``.
"""

from __future__ import annotations

import torch

from .. import storage
from ..config import Config
from ..storage import StorageOptions
from .checkpoint import load_dir
from .dist import DistContext
from .ibmil import stage_init


def mhim_init(cfg: Config, options: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """Teacher buffers (and student weights) from the baseline checkpoint ``model.mhim_teacher_init``.

    Raises ValueError when that checkpoint is not of an ``mhim`` model.
    """
    folder = cfg.model.mhim_teacher_init
    state = load_dir(folder, options)
    if state.get("model_meta", {}).get("name") != "mhim":
        raise ValueError(f"model.mhim_teacher_init: {storage.redact(folder, options)} holds a {state.get('model_meta', {}).get('name')!r} checkpoint, not an mhim baseline")
    weights = {k: v for k, v in state["model"].items() if not k.startswith("teacher.") and k != "progress"}
    init = {f"teacher.{k.removeprefix('encoder.').replace('.', '__')}": v for k, v in weights.items() if k.startswith("encoder.")}
    if cfg.model.mhim_student_init == "fc":
        init |= {k: v for k, v in weights.items() if k.startswith("encoder.embed.")}
    elif cfg.model.mhim_student_init == "all":
        init |= weights
    return init


def model_init(cfg: Config, run_dir: str | None, options: StorageOptions | None = None, ctx: DistContext | None = None) -> dict[str, torch.Tensor] | None:
    """Tensors to load into the model before training, or None (most models)."""
    if cfg.model.name == "ibmil":
        return stage_init(cfg, run_dir, options, ctx)
    if cfg.model.name == "mhim" and cfg.model.mhim_teacher_init:
        return mhim_init(cfg, options)
    return None
