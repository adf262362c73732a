"""Adding a model is its module plus one registration (docs/ARCHITECTURE.md, "Adding a model").

The proof follows the steps for an existing model: lossattn's module, copied under another name with another
option, registers itself when imported and is then a config section, a `config keys` entry and a model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from aem_dist.config import MODEL_OPTIONS, ConfigError, describe_keys, load_config
from aem_dist.models import MODELS, build_model

MODULE = Path(__file__).resolve().parents[2] / "aem_dist" / "models" / "lossattn.py"


def test_a_new_model_is_its_module_and_one_registration(tmp_path, monkeypatch):
    source = MODULE.read_text().replace('"lossattn"', '"lossattn_copy"').replace("lossattn_weight", "copy_weight")
    path = tmp_path / "lossattn_copy.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("aem_dist.models.lossattn_copy", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    try:
        spec.loader.exec_module(module)  # the one registration: importing the module (models/__init__.py lists it)
        cfg = load_config("demo", ["model.name=lossattn_copy", "model.copy_weight=1.5"])
        assert type(cfg.model).__name__ == "LossAttnOptions" and cfg.model.copy_weight == 1.5
        assert ("model.copy_weight", 2.0) in [(k, d) for k, d, _ in describe_keys()]
        with pytest.raises(ConfigError, match=r"model\.copy_weight is an option of model\.name=lossattn_copy only"):
            load_config("demo", ["model.copy_weight=1.5"])  # abmil has no such option
        model = build_model(cfg.model, 4, 2)
        out = model(torch.randn(5, 4), torch.tensor([0, 0, 0, 1, 1]), 2)
        assert out.logits.shape == (2, 2) and model.weight == 1.5
    finally:
        MODELS.pop("lossattn_copy", None)
        MODEL_OPTIONS.pop("lossattn_copy", None)
