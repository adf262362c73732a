"""Model registry: ``model.name`` → class (and its options class). Models register themselves with :func:`register`."""

from __future__ import annotations

from typing import Callable

from ..config import MODEL_OPTIONS, ModelConfig
from .base import MILModel

MODELS: dict[str, type[MILModel]] = {}


def register(name: str, options: type[ModelConfig] = ModelConfig) -> Callable[[type[MILModel]], type[MILModel]]:
    """Register a model class under ``name`` with the options class its ``model`` config section validates with."""

    def deco(cls: type[MILModel]) -> type[MILModel]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name], MODEL_OPTIONS[name] = cls, options
        return cls

    return deco


def population_note(name: str) -> str | None:
    """Why model ``name`` cannot train as one member of a population (None: it can, or no such model) — the one
    fusability rule besides the config keys members may differ in (:func:`aem_dist.engine.population.population_key`)."""
    return getattr(MODELS.get(name), "population_note", None)


def build_model(cfg: ModelConfig, in_dim: int, n_classes: int) -> MILModel:
    """Instantiate ``cfg.name`` for features of width ``in_dim`` and ``n_classes`` classes."""
    if cfg.name not in MODELS:
        raise ValueError(f"model.name {cfg.name!r} is not a known model; choose from {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name](cfg, in_dim, n_classes)
