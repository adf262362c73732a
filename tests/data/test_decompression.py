"""Compressed inputs that pass the shape limits cannot expand without bound: an HDF5 of gzip chunks or
a zarr of zstd chunks declaring ~1 GB in a few hundred KB, and a .pt holding a stride-0 expand, are
refused before anything is decompressed or copied (before: 4 MB gzip h5 → 9.2 GB RSS, 88 KB zstd zarr
→ 2.2 GB, 1.5 KB .pt → 7.2 GB; .pt never checked data.max_instances_per_bag)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from aem_dist.data.ingest import ingest
from aem_dist.data.limits import Limits
from aem_dist.data.sources import SourceError, open_source

N, D, CHUNK = 480_000, 512, 16_000  # 983 MB of float32 declared; within the default shape limits


def peak_rss_growth_mib(code: str) -> tuple[str, float]:
    """Run ``code`` after importing the sources in a fresh interpreter; its output and the peak-RSS growth (MiB)."""
    peak = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
    wrapped = f"import resource\nfrom aem_dist.data.sources import open_source\nbase = {peak}\n{code}\nprint('GROWTH', {peak} - base)"
    run = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, float(run.stdout.rsplit("GROWTH", 1)[1])


def load_code(fmt: str, src: Path, slide: str) -> str:
    return f"try:\n    open_source({fmt!r}, {str(src)!r}).load({slide!r})\n    print('LOADED')\nexcept Exception as err:\n    print('REFUSED', err)"


def gzip_bomb_h5(path: Path) -> None:
    """Every chunk is the same gzip block of ones, written raw: the file is small, the array is not."""
    block = zlib.compress(np.ones((CHUNK, D), np.float32).tobytes(), 9)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=(N, D), dtype="f4", chunks=(CHUNK, D), compression="gzip")
        for i in range(N // CHUNK):
            ds.id.write_direct_chunk((i * CHUNK, 0), block)
        f["coords"] = np.zeros((N, 2), np.int32)


def test_gzip_h5_bomb_is_refused_before_decompressing(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    gzip_bomb_h5(src / "bomb.h5")
    assert (src / "bomb.h5").stat().st_size < 8 << 20
    out, growth = peak_rss_growth_mib(load_code("clam", src, "bomb"))
    assert "REFUSED" in out and "decompression bomb" in out and "bomb.h5: 'features'" in out, out
    assert growth < 200, f"peak RSS grew by {growth:.0f} MiB"


def test_zstd_zarr_bomb_is_refused_before_decompressing(tmp_path):
    import zarr

    store = tmp_path / "bags.zarr"
    g = zarr.open_group(str(store), mode="w")
    slide = g.create_group("s0")
    slide.attrs["label"] = "a"
    arr = slide.create_array("features", shape=(N, D), dtype="f4", chunks=(CHUNK, D), compressors=zarr.codecs.ZstdCodec(level=19))
    arr[:CHUNK] = 1.0
    first = next((store / "s0" / "features" / "c").rglob("*"))
    first = next(p for p in (store / "s0" / "features" / "c").rglob("*") if p.is_file())
    for i in range(1, N // CHUNK):  # the same encoded chunk under every chunk key
        (store / "s0" / "features" / "c" / str(i)).mkdir(exist_ok=True)
        shutil.copyfile(first, store / "s0" / "features" / "c" / str(i) / "0")
    assert sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) < 1 << 20
    out, growth = peak_rss_growth_mib(load_code("zarr", store, "s0"))
    assert "REFUSED" in out and "decompression bomb" in out, out
    assert growth < 200, f"peak RSS grew by {growth:.0f} MiB"


def test_pt_stride0_expand_and_bag_size_are_checked(tmp_path):
    src = tmp_path / "pt"
    src.mkdir()
    torch.save(torch.ones(1, 16).expand(100_000_000, 16), src / "huge.pt")  # the 1e8 × 16 (beyond the instance limit)
    torch.save({"features": torch.ones(1, D).expand(N, D)}, src / "view.pt")  # within the limits, 983 MB once copied
    assert max(p.stat().st_size for p in src.iterdir()) < 4096
    with pytest.raises(SourceError, match=r"huge.pt: 'features' declares 100,000,000 instances, above data.max_instances_per_bag"):
        open_source("pt", str(src)).load("huge")
    out, growth = peak_rss_growth_mib(load_code("pt", src, "view"))
    assert "REFUSED" in out and "expanded or overlapping view" in out, out
    assert growth < 200, f"peak RSS grew by {growth:.0f} MiB"
    with pytest.raises(SourceError, match="above data.max_instances_per_bag = 10"):
        open_source("pt", str(src), Limits(max_instances_per_bag=10)).load("view")


def test_ordinary_compressed_inputs_still_ingest(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        with h5py.File(src / f"s{i}.h5", "w") as f:
            f.create_dataset("features", data=rng.normal(size=(300, D)).astype(np.float32), chunks=(100, D), compression="gzip")
            f.create_dataset("coords", data=np.arange(600, dtype=np.int32).reshape(300, 2) * 256, compression="gzip")
    (tmp_path / "l.csv").write_text("slide_id,label\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(4)))
    result = ingest("clam", str(src), str(tmp_path / "out"), labels_csv=str(tmp_path / "l.csv"), val_frac=0.25, test_frac=0.25, progress=False)
    assert sum(e.n_bags for e in result.manifest.splits.values()) == 4
