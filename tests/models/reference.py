"""Plain-numpy reference forwards of every model, one bag at a time, from the published definitions.

They read a model's parameters and nothing else of it, so a test comparing them with the packed
torch forward checks the architecture, the attention the AEM term sees, and the model's own loss.
Evaluation-mode semantics (no masking, deterministic pseudo-bags, no dropout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn


@dataclass
class Ref:
    probs: np.ndarray  # (C,) predicted class probabilities
    loss: float  # the model's own loss for this bag (no AEM)
    attention: list[list[np.ndarray]] = field(default_factory=list)  # [segment][head] → weights over the segment's instances


def params(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: p.detach().cpu().double().numpy() for name, p in model.named_parameters()}


def linear(p: dict, name: str, x: np.ndarray) -> np.ndarray:
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def relu(x):
    return np.maximum(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(s: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 (instances)."""
    e = np.exp(s - s.max(axis=0))
    return e / e.sum(axis=0)


def ce(logits: np.ndarray, y: int) -> float:
    m = logits.max()
    return float(-(logits[y] - m - np.log(np.exp(logits - m).sum())))


def gated(p: dict, name: str, h: np.ndarray) -> np.ndarray:
    return linear(p, f"{name}.w", np.tanh(linear(p, f"{name}.V", h)) * sigmoid(linear(p, f"{name}.U", h)))


def neg_entropy(a: np.ndarray) -> float:
    """Σ a log a in plain Python."""
    return float(sum(float(v) * float(np.log(v)) for v in a))


def naive_aem(attention: list[list[np.ndarray]]) -> float:
    """Per bag: mean over segments of the mean over heads of Σ a log a; 0 without attention."""
    if not attention:
        return 0.0
    return float(np.mean([np.mean([neg_entropy(a) for a in heads]) for heads in attention]))


def _abmil(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    a = softmax(gated(p, "attention", h)[:, 0])
    logits = linear(p, "classifier", a @ h)
    return Ref(softmax(logits), ce(logits, y), [[a]])


def _mha(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    nh, d = model.heads, model.head_dim
    q = linear(p, "q_proj", p["query"]).reshape(nh, d)
    k = linear(p, "k_proj", h).reshape(-1, nh, d)
    v = linear(p, "v_proj", h).reshape(-1, nh, d)
    a = softmax(np.einsum("nhd,hd->nh", k, q) / np.sqrt(d))  # (N, H)
    z = linear(p, "out_proj", np.einsum("nh,nhd->hd", a, v).reshape(-1))
    z = (z - z.mean()) / np.sqrt(z.var() + 1e-6) * p["norm.weight"] + p["norm.bias"]
    logits = linear(p, "classifier", z)
    return Ref(softmax(logits), ce(logits, y), [[a[:, j] for j in range(nh)]])


def _dsmil(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    c = linear(p, "instance_classifier", h)  # (N, C)
    q = np.tanh(linear(p, "query.2", relu(linear(p, "query.0", h))))
    crit = c.argmax(axis=0)  # (C,)
    a = softmax(q @ q[crit].T / np.sqrt(q.shape[1]))  # (N, C)
    bag_logits = linear(p, "bag_classifier", (a.T @ h).reshape(-1))
    max_logits = c.max(axis=0)
    probs = 0.5 * softmax(bag_logits) + 0.5 * softmax(max_logits)
    return Ref(probs, 0.5 * ce(bag_logits, y) + 0.5 * ce(max_logits, y), [[a[:, k] for k in range(a.shape[1])]])


def _acmil(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    a = softmax(gated(p, "attention", h))  # (N, K)
    kb = a.shape[1]
    z = a.T @ h  # (K, hidden)
    slide = linear(p, "slide_classifier", z.mean(axis=0))
    loss = ce(slide, y)
    if kb > 1:
        loss += np.mean([ce(linear(p, f"branch_classifiers.{j}", z[j]), y) for j in range(kb)])
        cos = [a[:, i] @ a[:, j] / np.linalg.norm(a[:, i]) / np.linalg.norm(a[:, j]) for i in range(kb) for j in range(i + 1, kb)]
        loss += float(np.mean(cos))
    return Ref(softmax(slide), float(loss), [[a[:, j]] for j in range(kb)])


def _dtfd(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    n = len(h)
    m = min(model.n_pseudo, n)
    s = gated(p, "attention1", h)[:, 0]
    attention, tier1_losses, tops, bottoms = [], [], [], []
    w1 = p["classifier1.weight"]
    for g in range(m):
        idx = np.arange(g, n, m)  # round-robin pseudo-bag
        a = softmax(s[idx])
        weighted = a[:, None] * h[idx]
        tier1_losses.append(ce(linear(p, "classifier1", weighted.sum(axis=0)), y))
        score = softmax((weighted @ w1.T).T)[-1]  # softmax over classes, last class
        tops.append(idx[np.argmax(score)])
        bottoms.append(idx[np.argmin(score)])
        attention.append([a])
    g = h[tops + bottoms]
    a2 = softmax(gated(p, "attention2", g)[:, 0])
    logits = linear(p, "classifier2", a2 @ g)
    return Ref(softmax(logits), ce(logits, y) + float(np.mean(tier1_losses)), attention)


def _clam(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    s = gated(p, "attention", h)[:, 0]
    a = softmax(s)
    logits = linear(p, "classifier", a @ h)
    n, n_classes = len(h), model.n_classes
    inst = linear(p, "instance_classifiers", h).reshape(n, n_classes, 2)
    k = min(model.k_sample, n // 2)
    inst_loss = 0.0
    if k > 0:
        order = np.argsort(-s, kind="stable")
        top, bottom = order[:k], order[n - k :]
        inst_loss = np.mean([ce(inst[i, y], 1) for i in top] + [ce(inst[i, y], 0) for i in bottom])
        if model.subtyping:
            inst_loss += sum(np.mean([ce(inst[i, c], 0) for i in top]) for c in range(n_classes) if c != y)
            inst_loss /= n_classes
    loss = model.bag_weight * ce(logits, y) + (1 - model.bag_weight) * inst_loss
    return Ref(softmax(logits), float(loss), [[a]])


def _pool(reduce):
    def ref(model, p, x, y):
        c = linear(p, "classifier", relu(linear(p, "embed.0", x)))
        logits = reduce(c, axis=0)
        return Ref(softmax(logits), ce(logits, y), [])

    return ref


REFERENCES = {
    "abmil": _abmil,
    "mha": _mha,
    "dsmil": _dsmil,
    "acmil": _acmil,
    "dtfd": _dtfd,
    "clam_sb": _clam,
    "maxpool": _pool(np.max),
    "meanpool": _pool(np.mean),
}


def reference(name: str, model: nn.Module, x: np.ndarray, y: int) -> Ref:
    """The numpy reference of model ``name`` on one bag ``x`` (N, D) with label ``y``."""
    return REFERENCES[name](model, params(model), np.asarray(x, dtype=np.float64), int(y))
