"""MIL models on packed batches. Importing this package registers every model."""

from . import abmil, acmil, c2c, clam, dsmil, dtfd, ibmil, ilra, lossattn, mha, mhim, pooling, transmil  # noqa: F401  (registers)
from .base import MILModel, MILOutput
from .registry import MODELS, build_model

__all__ = ["MILModel", "MILOutput", "MODELS", "build_model"]
