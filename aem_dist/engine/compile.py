"""The forward + loss of one training step, eager or compiled (``train.compile``), at ``train.precision``.

:func:`loss_step` returns ``step(batch) -> (loss, terms)``: the model's forward under the precision's
autocast, its output cast to float32 (:func:`aem_dist.engine.precision.float32_output`), the model's
named loss terms, the AEM term and the weighted total. With ``train.compile: on`` that whole function
goes through ``torch.compile(dynamic=True)`` — packed batches vary in length (and bag count), so
shapes are symbolic from the first call instead of recompiling per length. A few graphs are still
expected (one bag per step takes the plain-softmax fast path; a one-instance bag specialises a size
of 1); recompiles are capped by :data:`RECOMPILE_LIMIT` (past it, dynamo runs that frame eagerly) and
every new graph is logged with the batch shape that caused it.

Compiled and eager steps compute the same math; their float32 results differ only by operation
order inside fused kernels. The tests hold losses and metrics to :data:`COMPILE_RTOL`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, get_args

import torch

from ..config import CompileMode
from ..losses import attention_regulariser, total_loss
from . import precision as prec

log = logging.getLogger(__name__)

MODES = get_args(CompileMode)
RECOMPILE_LIMIT = 8  # graphs per compiled step: bag-count 1 vs many, size-1 specialisations, a few spare
COMPILE_RTOL = 1e-4  # compiled vs eager: relative tolerance on the loss of a step and on epoch stats

StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def compute_loss(model: torch.nn.Module, core: torch.nn.Module, feats, bag_index, n_bags: int, labels, *, lam: float, kind: str,
        precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (under autocast for bf16) and the loss: ``(total, {"ce": …, "aem": …, …})``, float32."""
    with prec.autocast(precision, feats.device):
        out = model(feats, bag_index, n_bags)
    out = prec.float32_output(out)  # loss, softmax and entropy in float32 outside autocast
    terms = core.loss_terms(out, labels)
    terms["aem"] = attention_regulariser(out, n_bags, kind)
    return total_loss(terms, lam), terms


def loss_step(model: torch.nn.Module, core: torch.nn.Module, cfg: Any) -> StepFn:
    """``step(batch) -> (loss, terms)`` for ``model`` (DDP-wrapped or not; ``core`` is the bare model).

    Build it once per run and keep it (the caller does: ``loop.Single``), so a compiled step keeps its
    graphs across epochs. Raises ValueError for an unknown ``train.compile``.
    """
    mode, precision, lam, kind = cfg.train.compile, cfg.train.precision, cfg.loss.lam, cfg.loss.kind
    if mode not in MODES:
        raise ValueError(f"train.compile {mode!r} not in {MODES}")

    def eager(feats, bag_index, n_bags, labels):
        return compute_loss(model, core, feats, bag_index, n_bags, labels, lam=lam, kind=kind, precision=precision)

    if mode == "off":
        def step(batch):
            return eager(batch.feats, batch.bag_index, batch.n_bags, batch.labels)
    else:
        # Dynamo caches graphs per code object, and every step function shares ``eager``'s code: a
        # new model (a new fit in this process) would count against the recompile cap of the last
        # one. One training runs per process at a time, so start its cache afresh.
        torch._dynamo.reset()
        compiled = compiled_fn(eager)
        graphs = GraphCounter()

        def step(batch):
            result = compiled(batch.feats, batch.bag_index, batch.n_bags, batch.labels)
            graphs.log_new(f"{batch.n_bags} bag(s), {batch.n_instances} instances")
            return result

    return step


def compiled_fn(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)`` with the recompile cap set (process-wide dynamo setting)."""
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    return torch.compile(fn, dynamic=True)


class GraphCounter:
    """Logs each graph torch.compile adds (dynamo's process-wide ``unique_graphs`` counter)."""

    def __init__(self) -> None:
        self.seen = self.count()

    @staticmethod
    def count() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def log_new(self, what: str) -> int:
        now = self.count()
        if now != self.seen:
            log.info("torch.compile: %d new graph(s) for a step of %s (%d so far in this process; cap %d per "
                "step)", now - self.seen, what, now, RECOMPILE_LIMIT)
            self.seen = now
        return now
