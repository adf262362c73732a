"""MHIM-MIL (Tang et al., ICCV 2023): a momentum (EMA) teacher scores instances; the student trains on
the bag with salient (hard-to-mine) and random instances masked, plus a teacher-student consistency loss.

Follows the official ICCV code (``modules/mhim.py`` and ``main.py`` of DearCaat/MHIM-MIL before the v2
rewrite) with the ABMIL baseline (``--baseline=attn``):
* encoder: h = Dropout(ReLU(W_r x)); attention s = w₂ᵀ ReLU(W₁ h) (no biases, the official
  ``Attention``), a = softmax(s) within the bag, bag embedding z = Σ a h, logits W_c z;
* teacher: the same encoder with EMA weights (buffers ``teacher.*``), run on the whole bag (no
  gradient, same train/eval mode as the student): teacher attention a_t and embedding z_t;
* masking, training only, per bag of n instances, union of
  - random: ⌈n·``mhim_mask_ratio``⌉ instances drawn uniformly;
  - low: the ⌈n·``mhim_mask_ratio_low``⌉ instances of lowest a_t;
  - high: of the ⌈n·r_h/ρ⌉ highest-a_t instances, ⌈·ρ⌉ drawn at random (ρ = ``mhim_mask_ratio_high_random``;
    when r_h/ρ > 1 all top-n are candidates and ρ becomes r_h, as the official ``select_mask_fn``),
    r_h = ``mhim_mask_ratio_high``, decayed by cosine to 0 over the run when ``mhim_high_decay``;
  the student attends over the rest. If that would mask every instance, the one with the lowest
  teacher attention is kept (the official code would pool an empty bag);
* loss: ``mhim_ce_weight``·CE(student) + ``mhim_consistency_weight``·Σ_d −softmax(z_t/τ_t)_d
  log softmax(z_s/τ_s)_d (the official ``SoftTargetCrossEntropy_v2`` on the bag embeddings);
* after every optimizer step (``after_step``): teacher ← m·teacher + (1 − m)·student, m =
  ``mhim_momentum`` (or its cosine schedule to ``mhim_momentum_final``).
The official recipe initialises the teacher (and the student's embedding) from a separately trained
ABMIL checkpoint; here the teacher starts as a copy of the student's initial weights (the official
``--no_tea_init``). Evaluation: the student on the whole bag. AEM attaches to the student's attention
over its kept instances (segments = bags).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call
from pydantic import Field

from ..config import ModelConfig
from .abmil import instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_count, segment_rank, segment_softmax, segment_sum


class Encoder(nn.Module):
    """Instance embedding + the official non-gated attention: feats (T, D) → h (T, hidden), s (T, 1)."""

    def __init__(self, in_dim: int, cfg: ModelConfig):
        super().__init__()
        attn_hidden = cfg.attn_hidden or cfg.hidden
        self.embed = instance_embedding(in_dim, cfg)
        self.attention = nn.Sequential(nn.Linear(cfg.hidden, attn_hidden, bias=False), nn.ReLU(), nn.Linear(attn_hidden, 1, bias=False))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(feats)
        return h, self.attention(h)


def _cosine(start: float, end: float, progress: float) -> float:
    """The official ``cosine_scheduler`` at a share ``progress`` of the run's steps."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _ceil(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """⌈n·ratio⌉ per bag as the official numpy ``ceil(ps * ratio)`` (float64)."""
    return torch.ceil(n.double() * ratio).long()


def mhim_mask(
    teacher_attn: torch.Tensor, bag_index: torch.Tensor, n_bags: int, *, random_ratio: float, low_ratio: float, high_ratio: float, high_random: float
) -> torch.Tensor:
    """(T,) teacher attention → (T,) bool, True where the student keeps the instance (see module doc).

    Random draws use ``torch.rand`` (the global RNG). Every bag keeps at least one instance.
    """
    t = teacher_attn.shape[0]
    dev = teacher_attn.device
    n = segment_count(bag_index, n_bags)  # (B,)
    masked = torch.zeros(t, dtype=torch.bool, device=dev)
    if random_ratio > 0:
        masked |= segment_rank(torch.rand(t, device=dev), bag_index, n_bags) < _ceil(n, random_ratio)[bag_index]
    if low_ratio > 0:
        masked |= segment_rank(teacher_attn, bag_index, n_bags, descending=False) < _ceil(n, low_ratio)[bag_index]
    if high_ratio > 0:
        cand_ratio, pick = high_ratio / high_random, high_random
        if cand_ratio > 1:
            cand_ratio, pick = 1.0, high_ratio
        k = _ceil(n, cand_ratio)  # (B,)
        top = segment_rank(teacher_attn, bag_index, n_bags) < k[bag_index]
        if pick < 1:
            key = torch.where(top, torch.rand(t, device=dev, dtype=torch.float64), torch.full((t,), -1.0, device=dev, dtype=torch.float64))
            top &= segment_rank(key, bag_index, n_bags) < _ceil(k, pick)[bag_index]
        masked |= top
    all_masked = segment_sum(masked.long(), bag_index, n_bags) == n  # (B,)
    if bool(all_masked.any()):
        lowest = segment_rank(teacher_attn, bag_index, n_bags, descending=False) == 0
        masked &= ~(lowest & all_masked[bag_index])
    return ~masked


class MHIMOptions(ModelConfig):
    mhim_mask_ratio: float = Field(0.5, ge=0.0, lt=1.0, description="share of each bag's instances masked uniformly at random for the student (the official "
        "CAMELYON16 ABMIL recipe's 0.5).")
    mhim_mask_ratio_low: float = Field(0.0, ge=0.0, lt=1.0, description="share of the lowest-teacher-attention instances masked (official CAMELYON16 ABMIL: "
        "0).")
    mhim_mask_ratio_high: float = Field(0.01, ge=0.0, lt=1.0, description="share of the highest-teacher-attention (hard/salient) instances considered for "
        "masking (official CAMELYON16 ABMIL: 0.01).")
    mhim_mask_ratio_high_random: float = Field(0.5, gt=0.0, le=1.0, description="of the high-attention candidates (ceil(n·high/this) top instances) this "
        "share, ceil'd, is masked at random (official: 0.5).")
    mhim_high_decay: bool = Field(True, description="decay the high-attention mask ratio by cosine to 0 over the run's steps (official --mrh_sche).")
    mhim_consistency_weight: float = Field(0.1, ge=0.0, description="weight of the teacher-student consistency loss (official CAMELYON16 ABMIL cl_alpha 0.1).")
    mhim_ce_weight: float = Field(1.0, ge=0.0, description="weight of the student's bag cross-entropy (official cls_alpha 1.0).")
    mhim_temp_teacher: float = Field(0.1, gt=0.0, description="temperature of the teacher's bag embedding in the consistency loss (official temp_t 0.1).")
    mhim_temp_student: float = Field(1.0, gt=0.0, description="temperature of the student's bag embedding in the consistency loss (official temp_s 1.0).")
    mhim_momentum: float = Field(0.9999, ge=0.0, le=1.0, description="EMA decay of the teacher after every optimizer step (official mm 0.9999).")
    mhim_momentum_final: float = Field(1.0, ge=0.0, le=1.0, description="final EMA decay when mhim_momentum_decay is on (official mm_final 1.0).")
    mhim_momentum_decay: bool = Field(False, description="cosine schedule of the EMA decay from mhim_momentum to mhim_momentum_final (official --mm_sche; off "
        "for CAMELYON16).")
    mhim_teacher_init: str | None = Field(None, description="folder with the state.pt of a trained baseline whose encoder starts the teacher (the official "
        "--teacher_init; e.g. <run>/best of an mhim run with mhim_mask_ratio=0, mhim_mask_ratio_high=0, mhim_consistency_weight=0, the official 'pure' ABMIL). "
        "None = the teacher starts as a copy of the student (--no_tea_init).")
    mhim_student_init: Literal["none", "fc", "all"] = Field("fc", description="mhim, with mhim_teacher_init: what of the baseline also starts the student: its "
        "instance embedding (fc, the official recipe's init_stu_type), everything (all) or nothing (none).")


@register("mhim", MHIMOptions)
class MHIM(MILModel):
    population_note = "its EMA teacher is updated after every optimizer step, state the stacked population does not carry"

    def __init__(self, cfg: MHIMOptions, in_dim: int, n_classes: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(in_dim, cfg)
        self.classifier = nn.Linear(cfg.hidden, n_classes)
        # the EMA teacher: buffers mirroring the encoder's parameters (in the state_dict, not trained)
        self.teacher = nn.Module()
        for name, p in self.encoder.named_parameters():
            self.teacher.register_buffer(name.replace(".", "__"), p.detach().clone())
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))  # share of the run's steps done

    def teacher_params(self) -> dict[str, torch.Tensor]:
        return {name.replace("__", "."): b for name, b in self.teacher.named_buffers()}

    def high_ratio(self) -> float:
        c = self.cfg
        return _cosine(c.mhim_mask_ratio_high, 0.0, float(self.progress)) if c.mhim_high_decay else c.mhim_mask_ratio_high

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        c = self.cfg
        h, s = self.encoder(feats)  # (T, hidden), (T, 1)
        extras: dict[str, torch.Tensor] = {}
        rows = None
        if self.training:
            with torch.no_grad():
                h_t, s_t = functional_call(self.encoder, self.teacher_params(), (feats,))
                a_t = segment_softmax(s_t, bag_index, n_bags)  # (T, 1)
                extras["teacher_embedding"] = segment_sum(a_t * h_t, bag_index, n_bags)  # (B, hidden)
                keep = mhim_mask(
                    a_t[:, 0], bag_index, n_bags,
                    random_ratio=c.mhim_mask_ratio, low_ratio=c.mhim_mask_ratio_low,
                    high_ratio=self.high_ratio(), high_random=c.mhim_mask_ratio_high_random,
                )
            rows = keep.nonzero().squeeze(1)  # (R,)
            h, s, seg = h[rows], s[rows], bag_index[rows]
        else:
            seg = bag_index
        a = segment_softmax(s, seg, n_bags)
        z = segment_sum(a * h, seg, n_bags)  # (B, hidden)
        extras["student_embedding"] = z
        return MILOutput(logits=self.classifier(z), attn_scores=s, attn_index=seg, n_segments=n_bags, attn_rows=rows, extras=extras)

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        terms = {"ce": c.mhim_ce_weight * self.bag_ce(out.logits, labels)}
        if "teacher_embedding" in out.extras:
            target = torch.softmax(out.extras["teacher_embedding"] / c.mhim_temp_teacher, dim=1)
            log_p = torch.log_softmax(out.extras["student_embedding"] / c.mhim_temp_student, dim=1)
            terms["consistency"] = c.mhim_consistency_weight * (-(target * log_p).sum(dim=1)).mean()
        return terms

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        c = self.cfg
        # the official loop uses the schedule value of the step just taken, i.e. at the progress before it
        m = _cosine(c.mhim_momentum, c.mhim_momentum_final, float(self.progress)) if c.mhim_momentum_decay else c.mhim_momentum
        teacher = self.teacher_params()
        names = [n for n, _ in self.encoder.named_parameters()]
        t = [teacher[n] for n in names]
        s = [p.detach() for _, p in self.encoder.named_parameters()]
        torch._foreach_mul_(t, m)
        torch._foreach_add_(t, s, alpha=1.0 - m)
        self.progress.fill_(progress)
