"""The data package's structure: loaders and sources are registries, one background-prefetch function,
one way to open a run's manifest (always under the configured limits), and no import circle."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path
from typing import get_args

import pytest

import aem_dist
from aem_dist.config import DataConfig
from aem_dist.data.folds import open_manifest
from aem_dist.data.manifest import ManifestError
from aem_dist.data.prefetch import in_background
from aem_dist.data.registry import LOADERS, open_split
from aem_dist.data.sources import FORMATS, SourceError, open_source
from tests.data.helpers import write_tiny

PACKAGE = Path(aem_dist.__file__).parent


def test_loader_registry_matches_the_config_choices():
    assert set(LOADERS) == set(get_args(DataConfig.model_fields["loader"].annotation))


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_every_registered_loader_opens_a_split_and_says_whether_it_holds_it(name, tmp_path):
    from aem_dist.data.loader import LoaderSpec

    root = str(tmp_path / "ds")
    m = write_tiny(root, n_train=4, n_val=1)
    cfg = DataConfig(root=root, loader=name, cache_dir=str(tmp_path / "cache"))
    loader = open_split(cfg, m, LoaderSpec("train", 0, 1, train=False))
    keys = [k for batch in loader.epoch(0) for k in batch.keys]
    assert sorted(keys) == sorted(b.key for b in m.splits["train"].bags())
    held = loader.in_memory()
    assert held is None or sorted(b.key for b in held.bags) == sorted(keys)


def test_an_unknown_loader_is_named():
    from aem_dist.data.loader import LoaderSpec

    cfg = DataConfig.model_construct(root="x", loader="carrier-pigeon")
    with pytest.raises(ValueError, match="'carrier-pigeon' is not a known loader; choose from memory, stream"):
        open_split(cfg, None, LoaderSpec("train"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_source_format_names_an_importable_reader(fmt, tmp_path):
    import importlib

    entry = FORMATS[fmt]
    assert callable(getattr(importlib.import_module(f"aem_dist.data.sources.{entry.module}"), entry.reader))
    with pytest.raises(SourceError):  # the reader runs: an empty folder is no source of any format
        open_source(fmt, str(tmp_path))


def test_an_unknown_format_lists_the_registered_ones(tmp_path):
    with pytest.raises(SourceError, match="unknown format 'tiff'; choose from " + ", ".join(FORMATS)):
        open_source("tiff", str(tmp_path))


def test_in_background_keeps_order_and_reraises_after_the_items_before():
    def items():
        yield from range(5)
        raise KeyError("boom")

    got = []
    with pytest.raises(KeyError, match="boom"):
        for x in in_background(items(), depth=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_in_background_stops_its_thread_when_the_consumer_stops():
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    it = in_background(endless(), depth=2, name="test-prefetch")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "test-prefetch" and t.is_alive() for t in threading.enumerate())
    n = len(made)
    time.sleep(0.3)
    assert len(made) == n and n <= 3 + 2 + 1  # at most depth ahead, and nothing after close


def test_open_manifest_applies_the_configured_limits_and_the_fold(tmp_path):
    from aem_dist.data.folds import record_folds

    root = str(tmp_path / "ds")
    write_tiny(root, n_train=8, n_val=2)
    record_folds(root, 2, val_frac=0.0)
    assert open_manifest(DataConfig(root=root)).n_classes == 2
    assert sum(e.n_bags for e in open_manifest(DataConfig(root=root, fold=1)).splits.values()) == 10
    assert open_manifest(DataConfig(root=root, fold=1)).splits["test"].n_bags == 5
    with pytest.raises(ManifestError, match=r"data.max_instances_per_bag = 2"):
        open_manifest(DataConfig(root=root, max_instances_per_bag=2))


def test_engine_and_observe_open_manifests_only_through_open_manifest():
    """load_manifest without the configured limits was how three of four readers went wrong."""
    offenders = []
    for area in ("engine", "observe"):
        for path in sorted((PACKAGE / area).glob("*.py")):
            tree = ast.parse(path.read_text())
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            if {"load_manifest", "fold_view"} & names:
                offenders.append(path.name)
    assert offenders == []


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports (relative imports resolved; lazy imports included)."""
    module = package + "." + path.stem if path.stem != "__init__" else package
    base = module.split(".") if path.stem == "__init__" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(parts + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_import_circle_inside_the_data_package():
    package = "aem_dist.data"
    files = {f"{package}.{p.stem}": p for p in (PACKAGE / "data").glob("*.py") if p.stem != "__init__"}
    graph = {m: {t for t in _imports(p, package) if t in files and t != m} for m, p in files.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, f"import circle: {' → '.join(cycles[0])}"
    assert "aem_dist.data.stream" in graph["aem_dist.data.registry"]  # the check sees real edges
