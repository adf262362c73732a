"""The training loop: one function, the same in a plain process and inside a Ray Train worker.

``fit(cfg)`` builds data, model and optimizer, then per epoch trains, evaluates val and test on all
bags, updates the best-by-validation selection and hands an :class:`EpochReport` to ``on_epoch``
(a local checkpoint writer, or Ray Train's ``report``). It never imports Ray.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import Config
from ..data.devicecache import place_on_device
from ..data.loader import LoaderSpec, SplitLoader, open_split
from ..data.manifest import Manifest, load_manifest
from ..data.packing import subsample
from ..models import build_model
from ..storage import StorageOptions
from . import precision
from .compile import loss_step
from .dist import DistContext, parallelize
from .evaluate import evaluate
from .metrics import selection_score
from .stepstats import NonFiniteLossError, StepStats  # noqa: F401  (NonFiniteLossError: re-exported)

log = logging.getLogger(__name__)


class CosineToZero:
    """Per-iteration cosine decay from the base lr to 0 over ``total`` steps (an object, so its state saves)."""

    def __init__(self, total: int):
        self.total = max(1, int(total))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))


@dataclass
class Data:
    manifest: Manifest
    train: SplitLoader
    val: SplitLoader | None
    test: SplitLoader | None


@dataclass
class EpochReport:
    """What the loop hands to ``on_epoch`` after each epoch (on every rank)."""

    epoch: int
    row: dict[str, Any]  # this epoch's history row
    is_best: bool
    best_epoch: int | None
    state: Callable[[], dict[str, Any]]  # the full checkpoint state, built on demand
    best_score: float = -math.inf
    step_times: list[float] = field(default_factory=list)  # rank 0's step durations this epoch (s)
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples skipped so far, by reason
    extra: dict[str, Any] = field(default_factory=dict)  # added by reporters, e.g. time/checkpoint_s

    def flat(self) -> dict[str, Any]:
        """One flat dict for reporters (Ray, Prometheus): ``epoch``, ``train/loss``, ``val/auc``, ...,
        ``best/epoch``, ``best/val_score``, ``skipped/<reason>`` and ``time/step_s`` (a list)."""
        out: dict[str, Any] = {"epoch": self.epoch}
        for section, values in self.row.items():
            if isinstance(values, dict):
                out.update({f"{section}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
            elif isinstance(values, (int, float)) and section != "epoch":
                out[section] = values
        out["best/epoch"] = -1 if self.best_epoch is None else self.best_epoch
        out["best/val_score"] = self.best_score
        out.update({f"skipped/{k}": v for k, v in self.skipped.items()})
        out["time/step_s"] = list(self.step_times)
        out.update(self.extra)
        return out


@dataclass
class FitResult:
    best_epoch: int | None
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, Any]]
    skipped: dict[str, int]
    manifest: Manifest
    resumed_after: int | None = None  # the checkpointed epoch training resumed after (None: from scratch)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_data(cfg: Config, ctx: DistContext, options: StorageOptions | None = None) -> Data:
    """The manifest and this rank's loaders for train, val and test."""
    manifest = load_manifest(cfg.data.root, options)
    t = cfg.train

    def loader(split: str, train: bool) -> SplitLoader | None:
        if split not in manifest.splits:
            return None
        spec = LoaderSpec(split, ctx.rank, ctx.world_size, train, t.seed, t.max_instances_per_batch, t.max_bags_per_batch, cfg.data.on_bad_sample)
        return place_on_device(open_split(cfg.data, manifest, spec, options), cfg.data.device_cache, ctx.device)

    train = loader("train", True)
    if train is None:
        raise ValueError(f"{cfg.data.root}: dataset has no 'train' split")
    return Data(manifest, train, loader("val", False), loader("test", False))


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel on CPU and CUDA (same update, one kernel instead of ~10 ops per tensor —
    the difference between a small model's step being optimizer-bound or not)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the global RNG (dropout, masking) from (seed, epoch, rank): resuming at an epoch boundary
    then replays exactly what an uninterrupted run would have done."""
    torch.manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)


def train_epoch(model, core, opt, sched, loader: SplitLoader, cfg: Config, ctx: DistContext, epoch: int) -> tuple[dict[str, float], list[float]]:
    """One epoch of training on this rank; returns stats over all ranks and this rank's step times.

    Stats: ``loss`` and every named loss term (``ce``, ``aem``, and model terms such as ``diversity``)
    as means per step, the unweighted term values (``aem`` is Σ a log a before λ); counts of steps,
    bags and instances summed over ranks; mean data-loading wait per rank. Losses stay on the device
    (:class:`StepStats`: read every ``train.log_every`` steps and at the end); step times are host
    times, so on a GPU they measure dispatch, not kernels.
    """
    model.train()
    stats = StepStats(ctx.device, cfg.train.log_every)
    step_loss = loss_step(model, core, cfg)  # forward + loss at train.precision, compiled if train.compile
    data_wait = 0.0
    step_times: list[float] = []
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + epoch * 131 + ctx.rank)
    it = iter(loader.epoch(epoch))
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            break
        data_wait += time.perf_counter() - t0
        batch = subsample(batch, cfg.data.subsample_ratio, gen).to(ctx.device)
        loss, terms = step_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        stats.add(loss, terms, batch.n_bags, batch.n_instances, batch.keys)  # no host sync
        if stats.due():
            stats.check(ctx, epoch)  # NonFiniteLossError on every rank, naming the step's bags
        step_times.append(time.perf_counter() - t0)
    out = stats.finish(ctx, epoch, extra={"data_wait_s": data_wait})  # checks, then sums over ranks
    out["data_wait_s"] /= ctx.world_size
    return out, step_times


def fit(
    cfg: Config,
    *,
    ctx: DistContext | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    options: StorageOptions | None = None,
) -> FitResult:
    """Train ``cfg`` to the end (from ``resume`` if given); evaluate val/test; pick the best epoch."""
    ctx = ctx or DistContext.current(resolve_device(cfg.train.device))
    log.info("numerics: %s", precision.configure(cfg.train.precision, cfg.train.deterministic, ctx.device))
    data = open_data(cfg, ctx, options)
    m = data.manifest
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    core = build_model(cfg.model, m.dim, m.n_classes)
    model = parallelize(core, ctx)
    opt = make_optimizer(core, cfg, ctx.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineToZero(sum(data.train.steps(e) for e in range(cfg.train.epochs))))
    history: list[dict[str, Any]] = []
    best_epoch, best_score, start = None, -math.inf, 0
    if resume is not None:
        core.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        history, best_epoch, best_score = list(resume["history"]), resume["best_epoch"], float(resume["best_score"])
        start = int(resume["epoch"]) + 1
        log.info("resuming after epoch %d (best so far: %s)", start - 1, best_epoch)

    def state(epoch: int) -> dict[str, Any]:
        return {
            "model": core.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "best_epoch": best_epoch,
            "best_score": best_score,
            "history": history,
            "model_meta": {"name": cfg.model.name, "dim": m.dim, "n_classes": m.n_classes, "class_names": m.class_names, "model": cfg.model.model_dump()},
        }

    bar = _progress(cfg, ctx, start)
    for epoch in range(start, cfg.train.epochs):
        seed_epoch(cfg.train.seed, epoch, ctx.rank)
        t0 = time.perf_counter()
        train_stats, step_times = train_epoch(model, core, opt, sched, data.train, cfg, ctx, epoch)
        row: dict[str, Any] = {"epoch": epoch, "train": train_stats, "lr": opt.param_groups[0]["lr"]}
        train_s = time.perf_counter() - t0
        last = epoch == cfg.train.epochs - 1
        if (epoch + 1) % cfg.train.eval_every == 0 or last:
            for split, loader in (("val", data.val), ("test", data.test)):
                if loader is not None:
                    row[split] = evaluate(core, loader, ctx, m.n_classes, epoch=epoch).metrics
        row["time"] = {"epoch_s": time.perf_counter() - t0, "train_s": train_s, "instances_per_s": train_stats["instances"] / max(train_s, 1e-9)}
        history.append(row)
        is_best = False
        if "val" in row:
            score = selection_score(row["val"], cfg.train.select_metric)
            if best_epoch is None or score > best_score:
                best_epoch, best_score, is_best = epoch, score, True
        if on_epoch is not None:
            on_epoch(EpochReport(epoch, row, is_best, best_epoch, lambda e=epoch: state(e), best_score, step_times, _skipped(data)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(_postfix(row))
        elif ctx.is_main:
            log.info("epoch %d: %s", epoch, _postfix(row))
        if cfg.debug.fail_at_epoch == epoch and ctx.is_main:
            raise RuntimeError(f"injected failure after epoch {epoch} (debug.fail_at_epoch)")
    if bar is not None:
        bar.close()
    best = history[[r["epoch"] for r in history].index(best_epoch)] if best_epoch is not None else (history[-1] if history else {})
    skipped = _skipped(data)
    return FitResult(best_epoch, best.get("val", {}), best.get("test", {}), history, skipped, m, start - 1 if resume is not None else None)


def _skipped(data: Data) -> dict[str, int]:
    total: dict[str, int] = {}
    for loader in (data.train, data.val, data.test):
        if loader is not None:
            for reason, n in loader.skipped.items():
                total[reason] = total.get(reason, 0) + int(n)
    return total


def _postfix(row: dict[str, Any]) -> str:
    parts = [f"loss {row['train']['loss']:.4f}", f"aem {row['train']['aem']:.3f}"]
    for split in ("val", "test"):
        if split in row:
            parts.append(f"{split} auc {row[split]['auc']:.3f} f1 {row[split]['f1']:.3f}")
    return ", ".join(parts)


def _progress(cfg: Config, ctx: DistContext, start: int):
    if not (cfg.train.progress and ctx.is_main):
        return None
    from ..progress import progress

    return progress(cfg.train.epochs, "epochs", "epoch", initial=start)
