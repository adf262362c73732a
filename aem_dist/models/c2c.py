"""C2C, Cluster-to-Conquer (Sharma et al., MIDL 2021): per-slide clustering, cluster-based sampling,
attention with a KL-to-uniform term inside clusters.

h = Dropout(ReLU(W_r x)); attention scores s = w₂ᵀ tanh(W₁ h) (the official ``WSIClassifier``), bag
logits W_c Σ a h, instance logits W_p h (the official ``patch_classifier``).

Training step, per bag (the official ``WSIClusterDataloader`` / ``train_model``):
* the bag's instances are clustered by k-means into min(``c2c_clusters``, n) clusters — on the
  L2-normalised features, as ``cluster_representation`` does with faiss. The official code re-clusters
  every epoch because its CNN encoder trains end to end; here the features are frozen, so the clusters
  are fixed: computed once per slide (sklearn ``KMeans``, one init seeded by this model's
  ``cluster_seed``, drawn from torch's RNG at construction, i.e. from ``train.seed``), and cached by a
  digest of the bag's features. The cache is part of the model's state (``get_extra_state``), so
  checkpoints carry it and a resumed run neither re-clusters nor changes anything;
* up to ``c2c_per_cluster`` instances are sampled from every cluster at random (torch's global RNG);
  the bag is those instances: a = softmax(s) over them.
Loss: CE(bag) + β · mean over sampled instances of CE(W_p h_i, y) + γ · Σ over clusters with at least
``c2c_min_cluster`` sampled instances of KL(uniform ‖ softmax(s within the cluster)) — the official
``KLDLoss`` (``F.kl_div(log_softmax(s_c), 1/n_c, 'batchmean')``, summed over clusters; clusters of
≤ 4 are skipped). Terms ``ce``, ``instance`` and ``kl_cluster`` (weights applied), means over bags.

Evaluation uses every instance and no clustering; the KL term then treats the bag as one cluster
(the official validation passes cluster 0 for every patch). AEM attaches to the bag attention over the
sampled instances: unlike C2C's KL it spans the whole bag and needs no reference distribution (the
paper's discussion).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field

from ..config import ModelConfig
from .abmil import instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_count, segment_log_softmax, segment_mean, segment_rank, segment_sum


def bag_digest(x: torch.Tensor) -> str:
    """A digest of one bag's features (values, shape and dtype): the key of its cached clusters."""
    arr = x.detach().cpu().contiguous().numpy()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(n, D) → (n,) int64 cluster ids in [0, min(k, n)): k-means on L2-normalised rows, one seeded init."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import normalize

    k = min(k, len(x))
    if k <= 1:
        return np.zeros(len(x), dtype=np.int64)
    xn = normalize(x.astype(np.float32))
    with warnings.catch_warnings():  # duplicate points give fewer distinct clusters: fine, ids stay < k
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=1, max_iter=25, random_state=seed)  # faiss' default 25 iterations
        return km.fit_predict(xn).astype(np.int64)


class C2COptions(ModelConfig):
    c2c_clusters: int = Field(8, ge=1, description="k-means clusters per slide (the official num_cluster 8).")
    c2c_per_cluster: int = Field(8, ge=1, description="instances sampled from each cluster per training step (the official num_img_per_cluster 8).")
    c2c_instance_weight: float = Field(0.01, ge=0.0, description="weight of the instance (patch) cross-entropy (the official beta 0.01).")
    c2c_kl_weight: float = Field(0.01, ge=0.0, description="weight of the within-cluster KL(uniform ‖ attention) term (the official gamma 0.01).")
    c2c_min_cluster: int = Field(5, ge=1, description="clusters with fewer sampled instances get no KL term (the official code skips clusters of <= 4).")


@register("c2c", C2COptions)
class C2C(MILModel):
    population_note = "its per-slide cluster cache lives on the module and is seeded per run"

    def __init__(self, cfg: C2COptions, in_dim: int, n_classes: int):
        super().__init__()
        self.k = cfg.c2c_clusters
        self.per_cluster = cfg.c2c_per_cluster
        self.beta = cfg.c2c_instance_weight
        self.gamma = cfg.c2c_kl_weight
        self.min_cluster = cfg.c2c_min_cluster
        attn_hidden = cfg.attn_hidden or cfg.hidden
        self.embed = instance_embedding(in_dim, cfg)
        self.attention = nn.Sequential(nn.Linear(cfg.hidden, attn_hidden), nn.Tanh(), nn.Linear(attn_hidden, 1))
        self.classifier = nn.Linear(cfg.hidden, n_classes)
        self.patch_classifier = nn.Linear(cfg.hidden, n_classes)
        # drawn from torch's RNG, which the loop seeds with train.seed before building the model
        self.register_buffer("cluster_seed", torch.randint(0, 2**31 - 1, ()))
        self.cache: dict[str, torch.Tensor] = {}  # bag digest → (n,) uint8 cluster ids
        self.clusterings = 0  # k-means runs done by this process (tests: the cache is used)

    # ---- the per-slide cluster cache, saved with the model ----
    def get_extra_state(self) -> dict[str, Any]:
        return {"clusters": dict(self.cache)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.cache = {str(k): v.to(torch.uint8) for k, v in state.get("clusters", {}).items()}

    def bag_clusters(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
        """(T,) int64: each instance's cluster within its bag (cached per bag)."""
        out = torch.empty(feats.shape[0], dtype=torch.int64)
        rows_of = torch.argsort(bag_index.cpu(), stable=True)
        counts = segment_count(bag_index, n_bags).cpu().tolist()
        start = 0
        for n in counts:
            rows = rows_of[start : start + n]
            start += n
            x = feats[rows.to(feats.device)]
            key = bag_digest(x)
            labels = self.cache.get(key)
            if labels is None:
                labels = torch.from_numpy(kmeans_labels(x.detach().cpu().float().numpy(), self.k, int(self.cluster_seed))).to(torch.uint8)
                self.cache[key] = labels
                self.clusterings += 1
            out[rows] = labels.long()
        return out.to(feats.device)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        s = self.attention(h)  # (T, 1)
        if self.training:
            cluster = self.bag_clusters(feats, bag_index, n_bags)  # (T,)
            cseg = bag_index * self.k + cluster
            draw = torch.rand(feats.shape[0], device=feats.device)
            rows = (segment_rank(draw, cseg, n_bags * self.k) < self.per_cluster).nonzero().squeeze(1)  # (R,)
            cluster = cluster[rows]
        else:  # every instance, one cluster per bag (the official validation)
            rows = torch.arange(feats.shape[0], device=feats.device)
            cluster = torch.zeros_like(bag_index)
        r_bag = bag_index[rows]
        scores = s[rows]  # (R, 1)
        log_a = segment_log_softmax(scores, r_bag, n_bags)
        z = segment_sum(torch.exp(log_a) * h[rows], r_bag, n_bags)  # (B, hidden)
        return MILOutput(
            logits=self.classifier(z),
            attn_scores=scores,
            attn_index=r_bag,
            n_segments=n_bags,
            attn_rows=None if not self.training else rows,
            attn_log=log_a,
            extras={"instance_logits": self.patch_classifier(h[rows]), "row_bag": r_bag, "row_cluster": cluster},
        )

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        n_bags = labels.shape[0]
        r_bag, cluster = out.extras["row_bag"], out.extras["row_cluster"]
        inst = F.cross_entropy(out.extras["instance_logits"], labels[r_bag], reduction="none")  # (R,)
        terms = {"ce": self.bag_ce(out.logits, labels), "instance": self.beta * segment_mean(inst, r_bag, n_bags).mean()}
        # KL(u ‖ p) within every cluster = −log n_c − mean_i log p_i, p = softmax of s over the cluster
        cseg = r_bag * self.k + cluster
        n_seg = n_bags * self.k
        log_p = segment_log_softmax(out.attn_scores[:, 0], cseg, n_seg)  # (R,)
        n_c = segment_count(cseg, n_seg)
        kl = -torch.log(n_c.clamp(min=1).to(log_p.dtype)) - segment_mean(log_p, cseg, n_seg)  # (S,)
        kl = torch.where(n_c >= self.min_cluster, kl, torch.zeros_like(kl))
        per_bag = segment_sum(kl, torch.arange(n_seg, device=kl.device) // self.k, n_bags)  # (B,)
        terms["kl_cluster"] = self.gamma * per_bag.mean()
        return terms
