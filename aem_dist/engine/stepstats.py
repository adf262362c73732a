"""Per-step training statistics kept on the device, read by the host only every few steps.

A training step used to turn each loss term into a Python float and check the loss for NaN with a
host bool plus a collective: on a GPU every one of those is a synchronisation that stalls the queue
of kernels. :class:`StepStats` instead writes each step's loss and named terms into a small device
buffer (one ``stack`` kernel, no sync) and reads that buffer once per window — every
``train.log_every`` steps, when the buffer is full, and at the end of the epoch. Reading it sums the
window in float64 on the host (like the old per-step ``float()`` accumulation) and checks every value
for NaN/Inf. A non-finite value stops every rank together (the check is a collective at the same step
count on every rank — ranks run equal steps) with one message naming the epoch, the step, the
member(s) and the bags of the first bad step on each rank.

So a NaN is caught at most one window late. The weights it poisoned are never checkpointed: the
epoch's last check runs before evaluation and before ``on_epoch`` hands the state to a checkpoint
writer, so the best (and latest) checkpoints on storage hold the last good epoch.

Shapes: the loss and each term may be scalars or ``(K,)`` vectors (one value per population member);
they are broadcast together, so scalar terms next to a ``(K,)`` loss are fine. Statistics come back
as floats for scalars and lists of K floats for vectors.

Raises :class:`NonFiniteLossError` from :meth:`StepStats.check` / :meth:`StepStats.finish`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

#: Rows the device buffer holds when ``log_every`` is 0 (check once per epoch): at most one host read
#: per this many steps, so the buffer stays small on an epoch of any length.
DEFAULT_WINDOW = 256


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN or Inf on some rank; every rank stops together."""


class StepStats:
    """Device-side accumulator of one epoch's loss terms and counts.

    ``add`` never synchronises with the device; ``check`` and ``finish`` read the buffer (one
    device→host copy per window) and, with several ranks, run one collective each.
    """

    def __init__(self, device: torch.device | str, log_every: int = 0):
        self.device = torch.device(device)
        self.window = int(log_every) if log_every and log_every > 0 else DEFAULT_WINDOW
        self.log_every = int(log_every or 0)
        self.names: list[str] = []  # "loss" then the term names, in the order of the first add
        self.shape: torch.Size | None = None  # broadcast shape of loss and terms: () or (K,)
        self.buf: torch.Tensor | None = None  # (window, 1 + n_terms, *shape) float32 on the device
        self.rows = 0  # rows of buf filled since the last read
        self.keys: list[list[str]] = []  # bag keys of each buffered row (host)
        self.step = 0  # steps added this epoch
        self.sums: dict[str, torch.Tensor] = {}  # float64 host sums over read windows, by name
        self.counts = {"steps": 0.0, "bags": 0.0, "instances": 0.0}
        self.bad: tuple[int, str, list[str]] | None = None  # first non-finite step read so far

    # -- per step (no host sync) ------------------------------------------------------------------
    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], n_bags: int, n_instances: int, keys: Sequence[str] = ()) -> None:
        """Record one step: ``loss`` and ``terms`` (tensors of shape () or (K,)); counts are host ints."""
        names = ["loss", *terms]
        values = torch.broadcast_tensors(loss.detach(), *(t.detach() for t in terms.values()))
        if self.buf is None or names != self.names or values[0].shape != self.shape:
            self._flush()  # term names or shapes changed (never within one model); start a new layout
            self.names, self.shape = names, values[0].shape
            self.buf = torch.empty((self.window, len(names), *self.shape), dtype=torch.float32, device=self.device)
        elif self.rows == self.window:
            self._flush()
        torch.stack([v.float() for v in values], out=self.buf[self.rows])
        self.rows += 1
        self.keys.append(list(keys))
        self.step += 1
        self.counts["steps"] += 1
        self.counts["bags"] += n_bags
        self.counts["instances"] += n_instances

    def due(self) -> bool:
        """True when ``train.log_every`` asks for a check after this step."""
        return self.log_every > 0 and self.step % self.log_every == 0

    # -- reads (one host sync each) -----------------------------------------------------------------
    def check(self, ctx: Any, epoch: int) -> None:
        """Read the buffered steps; raise :class:`NonFiniteLossError` on every rank if any rank saw a
        non-finite value. ``ctx`` is the :class:`~aem_dist.engine.dist.DistContext` (a collective
        when distributed: call at the same step on every rank)."""
        self._flush()
        if ctx.all_true(self.bad is None):
            return
        reports = ctx.gather_objects((ctx.rank, self.bad))
        lines = []
        for rank, item in reports:
            if item is None:
                continue
            step, where, keys = item
            shown = ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
            lines.append(f"rank {rank} step {step}{where}: bags [{shown}]")
        raise NonFiniteLossError(f"epoch {epoch}: non-finite loss — " + "; ".join(lines))

    def finish(self, ctx: Any, epoch: int, extra: dict[str, float] | None = None) -> dict[str, Any]:
        """The epoch's statistics over all ranks (after a last :meth:`check`): ``loss`` and every term
        as means per step (float, or list of K floats); ``steps``, ``bags``, ``instances`` and the
        host numbers in ``extra`` summed over ranks (one collective for all of them)."""
        extra = dict(extra or {})
        self.check(ctx, epoch)
        flat: list[float] = []
        layout: list[tuple[str, int]] = []
        for name, value in self.sums.items():
            vals = value.reshape(-1).tolist()
            layout.append((name, len(vals)))
            flat += vals
        # Every rank runs the same steps with the same model, so names and shapes agree across ranks.
        tail = {**self.counts, **extra}
        total = ctx.sum(flat + list(tail.values()))
        steps = max(total[len(flat)], 1.0)
        out: dict[str, Any] = {}
        pos = 0
        for name, n in layout:
            vals = [v / steps for v in total[pos : pos + n]]
            out[name] = vals[0] if self.shape == torch.Size([]) else vals
            pos += n
        out.setdefault("loss", 0.0)  # an epoch of no steps still reports a loss, as before
        out |= dict(zip(tail, total[len(flat) :]))
        return out

    def _flush(self) -> None:
        """Move the buffered rows into the host float64 sums; remember (step, member note, keys) of
        the first non-finite row in ``self.bad``."""
        if self.buf is None or self.rows == 0:
            return
        rows = self.buf[: self.rows].to("cpu", torch.float64)  # the one device→host copy per window
        first_step = self.step - self.rows
        self.rows = 0
        keys, self.keys = self.keys, []
        finite = torch.isfinite(rows)
        if self.bad is None and not bool(finite.all()):
            row_ok = finite.reshape(rows.shape[0], -1).all(dim=1)
            i = int((~row_ok).nonzero()[0])
            where = ""
            if rows.dim() > 2:  # (rows, names, K): name the population members that went bad
                members = (~finite[i]).any(dim=0).nonzero().reshape(-1).tolist()
                where = f" (member{'s' if len(members) > 1 else ''} {', '.join(map(str, members))})"
            self.bad = (first_step + i, where, keys[i])
        sums = rows.sum(dim=0)  # (names, *shape) float64
        for j, name in enumerate(self.names):
            self.sums[name] = self.sums[name] + sums[j] if name in self.sums else sums[j]
