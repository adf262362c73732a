"""Populations: K members of one architecture trained together on the same packed batches.

A sweep's grid points that differ only in ``loss.lam``, ``loss.kind``, ``train.seed`` (initialisation),
``train.lr`` and ``train.weight_decay`` see the same data in the same order (equal ``train.data_seed``),
so they can share one data stream, one process and one forward over each batch.

Layout. Every member is first built exactly as its standalone run builds it (under its own
``train.seed``); then all parameters are copied into ONE leaf ``flat`` of shape ``(K, P)`` — member k's
parameters are row k, each named parameter a view ``flat[:, a:b].view(K, *shape)``. One leaf means
one gradient tensor, per-member clipping as a norm over dim 1, and an AdamW update that is a handful
of tensor ops over the whole population (:class:`StackedAdamW`), with per-member lr and weight decay
broadcast along the member axis. DDP sees one parameter.

Forward. ``torch.func.functional_call`` of a parameter-less copy of the model (on the meta device)
under ``torch.func.vmap`` over the member axis: one call yields every member's logits and loss terms.
Models whose forward cannot be vmapped (data-dependent shapes: ACMIL's masking, DTFD's distillation,
CLAM's and DSMIL's instance selection) run member after member on the same batch, each with its own
RNG stream restored around its forward, so every random draw equals the standalone run's.

Loss. Σ_k L_k, never a mean over members: members share no parameter, so ∂(Σ L)/∂θ_k = ∂L_k/∂θ_k and
each member gets exactly its standalone gradient.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..losses import attention_regulariser, total_loss
from ..models import MILModel, build_model
from ..models.registry import population_note
from . import precision as prec
from .dist import parallelize

log = logging.getLogger(__name__)

# Keys that may differ between the members of one population; anything else splits populations.
MEMBER_KEYS = ("loss.lam", "loss.kind", "train.seed", "train.lr", "train.weight_decay")


class Population(nn.Module):
    """K members with stacked parameters in one ``(K, P)`` leaf.

    Args:
        members: the K models, each initialised as its standalone run would be (same class and config).
        kl_uniform: (K,) bools, True where a member uses the KL ablation (``loss.kind``); each member's
            λ weighs the terms outside (``Members.lam``).
    """

    def __init__(self, members: list[MILModel], kl_uniform: list[bool], precision: str = "fp32"):
        super().__init__()
        self.precision = precision
        if not members:
            raise ValueError("a population needs at least one member")
        first = members[0]
        self.size = len(members)
        self.names = [n for n, _ in first.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in first.named_parameters()]
        numels = [math.prod(s) for s in self.shapes]
        self.offsets = [0, *itertools.accumulate(numels)]
        rows = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) if numels else torch.zeros(0) for m in members]
        self.flat = nn.Parameter(torch.stack(rows))  # (K, P)
        self.buffer_names = [n for n, _ in first.named_buffers()]
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{i}", torch.stack([dict(m.named_buffers())[name].detach() for m in members]))
        # The architecture without weights: functional_call supplies each member's tensors. The input
        # Linear (if the model names one) is left out of it: its product with the shared batch is one
        # large matmul for all members, (T, D) @ (D, K·H), instead of a batched one per member under vmap.
        base = copy.deepcopy(first).to("meta")
        self.input_linear = first.input_linear
        if self.input_linear is not None:
            parent, leaf = self.input_linear.rpartition(".")[::2]
            setattr(base.get_submodule(parent), leaf, nn.Identity())
        object.__setattr__(self, "base", base)
        self.register_buffer("kl_mask", torch.tensor(kl_uniform, dtype=torch.bool), persistent=False)
        self.vectorised = True  # decided by probe()
        self.chunk: int | None = None  # members per chunk of a step; None: sized to the cache per batch (chunk_size)
        shapes = dict(zip(self.names, self.shapes))
        self.hidden = shapes[f"{self.input_linear}.weight"][0] if f"{self.input_linear}.weight" in shapes else 128  # activation width

    # --- views --------------------------------------------------------------------------------

    def params(self) -> dict[str, torch.Tensor]:
        """Name → (K, *shape) view of ``flat`` (differentiable)."""
        return {n: self.flat[:, a:b].view(self.size, *s) for n, s, a, b in zip(self.names, self.shapes, self.offsets, self.offsets[1:])}

    def buffers_stacked(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"buffer_{i}") for i, n in enumerate(self.buffer_names)}

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights as its standalone model's ``state_dict`` (loadable by predict/heatmap)."""
        state = {n: v[k].detach().clone() for n, v in self.params().items()}
        state.update({n: v[k].detach().clone() for n, v in self.buffers_stacked().items()})
        return state

    def train(self, mode: bool = True) -> "Population":
        super().train(mode)
        self.base.train(mode)
        return self

    # --- forward ------------------------------------------------------------------------------

    def _member(self, params, buffers, feats, bag_index, n_bags, labels, kl: bool | None):
        with prec.autocast(self.precision, feats.device):
            out = functional_call(self.base, (params, buffers), (feats, bag_index, n_bags))
        out = prec.float32_output(out)  # loss, softmax and entropy in float32 whatever the precision
        terms = self.base.loss_terms(out, labels)
        if kl is None:  # vectorised: both kinds, picked per member outside (a per-batch constant apart)
            return terms, attention_regulariser(out, n_bags, "neg_entropy"), attention_regulariser(out, n_bags, "kl_uniform")
        terms["aem"] = attention_regulariser(out, n_bags, "kl_uniform" if kl else "neg_entropy")
        return terms

    def _inputs(self, feats: torch.Tensor, part: slice = slice(None)) -> tuple[dict[str, torch.Tensor], torch.Tensor, int | None]:
        """The parameters of members ``part`` the forward still needs, its input and the input's member axis (None: shared)."""
        rows = self.flat if part == slice(None) else self.flat[part]  # (k, P): one slice, then per-name views of it
        k = rows.shape[0]
        params = {n: rows[:, a:b].view(k, *s) for n, s, a, b in zip(self.names, self.shapes, self.offsets, self.offsets[1:])}
        if self.input_linear is None:
            return params, feats, None
        w = params.pop(f"{self.input_linear}.weight")  # (k, H, D)
        b = params.pop(f"{self.input_linear}.bias", None)  # (k, H)
        # The step's largest matmul: at train.precision like every other Linear (bf16: bfloat16 in, float32
        # accumulation, bfloat16 out, as nn.Linear under autocast), so no FLOP of the step is left in float32.
        with prec.autocast(self.precision, feats.device):
            pre = (feats @ w.reshape(-1, w.shape[-1]).t()).view(feats.shape[0], k, -1)  # (T, k, H)
        if b is not None:
            pre = pre + b.to(pre.dtype)  # (fp32: the same tensor, so the float32 path is unchanged)
        return params, pre.transpose(0, 1), 0  # (k, T, H)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int, labels: torch.Tensor, rng: "MemberRNG | None" = None,
            part: slice = slice(None)) -> dict[str, torch.Tensor]:
        """Members ``part``'s (default: all) named loss terms on one packed batch: name → (k,) (``aem`` unweighted)."""
        params, x, x_dim = self._inputs(feats, part)
        buffers = {n: b[part] for n, b in self.buffers_stacked().items()}
        if self.vectorised:
            fn = vmap(lambda p, b, x: self._member(p, b, x, bag_index, n_bags, labels, None), in_dims=(0, 0, x_dim), randomness="different")
            terms, neg, kl = fn(params, buffers, x)
            terms["aem"] = torch.where(self.kl_mask[part], kl, neg)
            return terms
        per_member = []
        for i, k in enumerate(range(self.size)[part]):
            with rng.member(k) if rng is not None else contextlib.nullcontext():
                xk = x if x_dim is None else x[i]
                per_member.append(self._member({n: p[i] for n, p in params.items()}, {n: b[i] for n, b in buffers.items()}, xk, bag_index, n_bags, labels,
                    bool(self.kl_mask[k])))
        return {name: torch.stack([t[name] for t in per_member]) for name in per_member[0]}

    def chunks(self, instances: int) -> list[slice]:
        """The member chunks of a step over ``instances`` rows (:func:`chunk_size`, or ``self.chunk`` when set)."""
        return member_chunks(self.size, self.chunk or chunk_size(instances, self.hidden, self.size, self.precision))

    @torch.no_grad()
    def predict(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Members ``part``'s (default: all) bag logits (k, B, C) and per-instance attention (k, T) (None without attention)."""
        params, x, x_dim = self._inputs(feats, part)
        buffers = {n: b[part] for n, b in self.buffers_stacked().items()}

        def one(p, b, x):
            with prec.autocast(self.precision, x.device):  # evaluation at the training precision too
                out = functional_call(self.base, (p, b), (x, bag_index, n_bags))
            out = prec.float32_output(out)
            attn = out.instance_attention(bag_index, n_bags)
            return out.logits, (attn if attn is not None else out.logits.new_zeros(0))

        if self.vectorised:
            logits, attn = vmap(one, in_dims=(0, 0, x_dim))(params, buffers, x)
        else:
            outs = [one({n: p[i] for n, p in params.items()}, {n: b[i] for n, b in buffers.items()}, x if x_dim is None else x[i])
                for i in range(len(range(self.size)[part]))]
            logits, attn = torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
        return logits, (attn if attn.shape[-1] == feats.shape[0] else None)

    def probe(self, dim: int, device: torch.device) -> None:
        """Decide once whether the forward vectorises (``vmap``) or runs member after member; logs why."""
        feats = torch.randn(7, dim, device=device, dtype=self.flat.dtype)
        bag_index = torch.tensor([0, 0, 0, 1, 1, 1, 1], device=device)
        labels = torch.tensor([0, 0], device=device)
        was = self.training
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                for mode in (True, False):
                    self.train(mode)
                    self.forward(feats, bag_index, 2, labels)
                    self.predict(feats, bag_index, 2)
        except Exception as err:  # noqa: BLE001  (any failure of the batching rules means: run a loop)
            self.vectorised = False
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            log.info("population of %d %s: the forward does not vectorise (%s); members run one after another on each "
                "batch", self.size, type(self.base).__name__, first)
        finally:
            self.train(was)


class MemberRNG:
    """One global-RNG stream per member, swapped in around that member's forward (loop mode), so its
    dropout and masking draws equal those of its standalone run, which seeds the global RNG per epoch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.states: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def seed(self, seeds: list[tuple[int, int, int]]) -> None:
        """Each member's stream as its standalone run seeds it: ``seed_epoch(seed, epoch, rank)``."""
        from .loop import seed_epoch_value  # (loop imports this module lazily)

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.states = []
            for s in seeds:
                torch.manual_seed(seed_epoch_value(*s))
                self.states.append(self._get())

    def _get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextlib.contextmanager
    def member(self, k: int):
        """Member k's stream is the global RNG inside the block; the caller's is restored after it."""
        saved = self._get()
        self._set(self.states[k])
        try:
            yield
        finally:
            self.states[k] = self._get()
            self._set(saved)

    def state_dict(self) -> list[list[torch.Tensor]]:
        return [[cpu] + ([cuda] if cuda is not None else []) for cpu, cuda in self.states]

    def load_state_dict(self, states: list[list[torch.Tensor]]) -> None:
        self.states = [(s[0], s[1] if len(s) > 1 else None) for s in states]


class StackedAdamW(torch.optim.Optimizer):
    """AdamW over stacked parameters ``(K, ...)`` with per-member lr and weight decay.

    AdamW is elementwise, so one update over the stack equals K separate ``torch.optim.AdamW`` updates
    when lr and weight decay broadcast along the member axis. torch's AdamW takes one scalar lr per
    param group (and scaling the loss cannot emulate a per-member lr: Adam is scale-invariant), hence
    this update. The group's ``lr`` is a multiplier (1.0, then the cosine schedule's value), so
    ``LambdaLR`` drives it like any optimizer; member k's lr is ``member_lr[k] · group lr``.
    """

    def __init__(self, params, member_lr: torch.Tensor, member_wd: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=1.0, betas=betas, eps=eps))
        self.member_lr = member_lr  # (K,)
        self.member_wd = member_wd  # (K,)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                shape = (-1,) + (1,) * (p.dim() - 1)
                lr = (self.member_lr * group["lr"]).to(p.dtype).view(shape)  # (K, 1, ...)
                wd = self.member_wd.to(p.dtype).view(shape)
                g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                p.addcdiv_(m * (lr / (1 - beta1**t)), denom, value=-1.0)
        return None

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["member_lr"], out["member_wd"] = self.member_lr.clone(), self.member_wd.clone()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.member_lr.copy_(state_dict.pop("member_lr"))
        self.member_wd.copy_(state_dict.pop("member_wd"))
        super().load_state_dict(state_dict)


def clip_member_grads_(flat: nn.Parameter, max_norm: float) -> torch.Tensor:
    """Per-member gradient clipping, as ``clip_grad_norm_`` does for each standalone run: (K,) norms."""
    norms = flat.grad.norm(dim=1)  # (K,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    flat.grad.mul_(coef.unsqueeze(1))
    return norms


class Members:
    """The population counterpart of :class:`aem_dist.engine.loop.Single`: what ``fit_members`` trains.

    Args:
        cfgs: one config per member; they may differ only in :data:`MEMBER_KEYS` (see
            :func:`check_fusable`).
    """

    def __init__(self, cfgs: list, manifest, ctx):
        check_fusable(cfgs)
        note = population_note(cfgs[0].model.name)
        if note:
            raise ValueError(f"model.name={cfgs[0].model.name} cannot train as a population: {note}")
        self.cfgs = cfgs
        self.size = len(cfgs)
        cores = []
        for c in cfgs:
            torch.manual_seed(c.train.seed)  # each member initialised exactly as its standalone run
            cores.append(build_model(c.model, manifest.dim, manifest.n_classes))
        self.pop = Population(cores, [c.loss.kind == "kl_uniform" for c in cfgs], cfgs[0].train.precision).to(ctx.device)
        if cfgs[0].train.compile == "on":
            log.info("train.compile=on: a population's step runs eagerly (vmap over members); compile applies to single runs")
        self.pop.probe(manifest.dim, ctx.device)
        self.module = parallelize(self.pop, ctx)
        dtype = self.pop.flat.dtype
        self.lam = torch.tensor([c.loss.lam for c in cfgs], dtype=dtype, device=ctx.device)
        self.optimizer = StackedAdamW(
            [self.pop.flat],
            member_lr=torch.tensor([c.train.lr for c in cfgs], dtype=torch.float64, device=ctx.device),
            member_wd=torch.tensor([c.train.weight_decay for c in cfgs], dtype=torch.float64, device=ctx.device),
        )
        self.rng = MemberRNG(ctx.device)
        self.dtype = dtype  # features are cast to the members' dtype per step

    def loss(self, batch, part: slice = slice(None)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``((k,) totals, named (k,) terms)`` of members ``part`` (default: all) over the shared batch."""
        terms = self.module(batch.feats, batch.bag_index, batch.n_bags, batch.labels, rng=None if self.pop.vectorised else self.rng, part=part)
        return total_loss(terms, self.lam[part]), terms

    def backward(self, batch, ctx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward, loss and backward of one step, chunk of members after chunk (:func:`member_chunks`): each
        chunk's activations are made and consumed by its backward while they are still in cache, instead of
        K members' activations streaming through memory. Members share no parameter, so the gradient is the
        same as one backward of Σ_k L_k. Returns the detached ``((K,) totals, named (K,) terms)``."""
        parts = self.pop.chunks(batch.n_instances)
        share = ctx.bag_share(batch.n_bags, self.lam)  # one all-reduce per step, whatever the chunks
        losses, terms = [], []
        for i, part in enumerate(parts):
            # DDP: gradients of earlier chunks accumulate locally; the last chunk's backward all-reduces them all.
            quiet = i < len(parts) - 1 and hasattr(self.module, "no_sync")
            with self.module.no_sync() if quiet else contextlib.nullcontext():
                loss, t = self.loss(batch, part)
                (loss * share).sum().backward()
            losses.append(loss.detach())
            terms.append({k: v.detach() for k, v in t.items()})
        if len(parts) == 1:
            return losses[0], terms[0]
        return torch.cat(losses), {k: torch.cat([t[k] for t in terms]) for k in terms[0]}

    def clip_grads_(self, max_norm: float) -> None:
        clip_member_grads_(self.pop.flat, max_norm)

    def after_step(self, progress: float) -> None:
        pass  # models with per-step state (MHIM-MIL's teacher) set population_note and never fuse

    def seed_epoch(self, epoch: int, rank: int) -> None:
        from .loop import seed_epoch

        seed_epoch(self.cfgs[0].train.seed, epoch, rank)  # vectorised draws: one stream for all members
        self.rng.seed([(c.train.seed, epoch, rank) for c in self.cfgs])

    def predict(self, loader, ctx, epoch: int):
        from .evaluate import predict_population

        return predict_population(self.pop, loader, ctx, epoch=epoch)

    def lrs(self) -> list[float]:
        return (self.optimizer.member_lr * self.optimizer.param_groups[0]["lr"]).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"population": self.pop.state_dict(), "member_rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pop.load_state_dict(state["population"])
        self.rng.load_state_dict(state["member_rng"])

    def member_model_state(self, k: int) -> dict[str, torch.Tensor]:
        return self.pop.member_state_dict(k)


ACTIVATION_TENSORS = 8  # (T, hidden)-sized tensors of one member live in a gated-attention forward + backward
_CACHE: list[int] = []  # cache_bytes(), read once


def _cpus(cpu_list: str) -> int:
    """How many CPUs a sysfs list such as ``0-3,8`` names."""
    return sum(int(hi or lo) - int(lo) + 1 for lo, _, hi in (r.partition("-") for r in cpu_list.strip().split(",") if r))


def cache_bytes(sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The cache one chunk of members should fit in: one core's L2 plus its share of the L3 (sysfs), else 2 MiB."""
    if _CACHE and sysfs == "/sys/devices/system/cpu/cpu0/cache":
        return _CACHE[0]
    per_level: dict[int, int] = {}
    for d in Path(sysfs).glob("index*"):
        try:
            level, size, shared = (d / "level").read_text(), (d / "size").read_text().strip(), (d / "shared_cpu_list").read_text()
            n = int(size.rstrip("KM")) * {"K": 1024, "M": 1024**2}.get(size[-1], 1)
            per_level[int(level)] = n // max(1, _cpus(shared)) if int(level) == 3 else n
        except (OSError, ValueError):
            continue
    out = per_level.get(2, 0) + per_level.get(3, 0) or 2 * 1024**2
    if sysfs == "/sys/devices/system/cpu/cpu0/cache":
        _CACHE.append(out)
    return out


def chunk_size(instances: int, hidden: int, members: int, precision: str) -> int:
    """Members per chunk so that one chunk's activations, ``ACTIVATION_TENSORS × instances × hidden``
    words each, fit in :func:`cache_bytes` (at least 1, at most all)."""
    word = 2 if precision == "bf16" else 4
    per_member = ACTIVATION_TENSORS * max(1, instances) * hidden * word
    return max(1, min(members, cache_bytes() // per_member))


def member_chunks(members: int, chunk: int) -> list[slice]:
    """``members`` split into contiguous slices of ``chunk`` (the last may be shorter)."""
    return [slice(a, min(a + chunk, members)) for a in range(0, members, max(1, chunk))]


def population_key(cfg) -> str:
    """What must be equal for two configs to fuse: the config without :data:`MEMBER_KEYS`, with the
    data seed resolved (``train.data_seed`` follows ``train.seed`` unless set)."""
    data = cfg.to_dict()
    data["train"]["data_seed"] = cfg.train.seed if cfg.train.data_seed is None else cfg.train.data_seed
    for dotted in MEMBER_KEYS:
        section, leaf = dotted.split(".")
        data[section].pop(leaf, None)
    data.pop("sweep", None)
    return json.dumps(data, sort_keys=True)


def check_fusable(cfgs: list) -> None:
    """Raise ValueError naming the first key (outside :data:`MEMBER_KEYS`) on which members differ."""
    keys = [population_key(c) for c in cfgs]
    for k, key in enumerate(keys[1:], 1):
        if key != keys[0]:
            a, b = json.loads(keys[0]), json.loads(key)
            diff = sorted(f"{s}.{f}" for s in a for f in set(a[s]) | set(b.get(s, {})) if isinstance(a[s], dict) and a[s].get(f) != b.get(s, {}).get(f))
            raise ValueError(f"population member {k} differs from member 0 in {', '.join(diff) or 'its config'}: only {', '.join(MEMBER_KEYS)} may differ")
