"""Sizes declared by hostile input are checked before anything is allocated, and manifest paths stay
inside the dataset root: sparse tar members, npy headers, h5/zarr shapes, manifest dims/counts,
heatmap coordinates, '../' and device-file shard names."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from aem_dist.data.limits import Limits, SizeError
from aem_dist.data.manifest import ManifestError, load_manifest, parse_manifest
from aem_dist.data.schema import BadSampleError, load_npy
from aem_dist.data.shards import index_tar, read_shard
from aem_dist.data.verify import verify_dataset
from tests.data.helpers import CLASSES, DIM, members_of, npy, tar_bytes, tiny_bag, write_raw_dataset, write_tiny

SPARSE_BYTES = 600 * 1024**2  # what the 3 KB shard below would expand to


def sparse_member_tar(name: str, real_size: int = SPARSE_BYTES) -> bytes:
    """A tar whose one member is an old-GNU sparse file: 512 stored bytes that read back as ``real_size``."""
    info = tarfile.TarInfo(name)
    info.size = 512
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(real_size - 512, 12, tarfile.GNU_FORMAT) + tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header[:512]) + b"\x01" * 512 + b"\0" * 1024


def _peak_rss_growth_mib(setup: str, code: str) -> tuple[str, float]:
    """Run ``setup`` then ``code`` in a fresh interpreter; the output and how far ``code`` raised the
    peak RSS above what ``setup`` (the imports) had reached, in MiB."""
    peak = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
    wrapped = f"import resource\n{setup}\nbase = {peak}\n{code}\nprint('GROWTH', {peak} - base)"
    run = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, float(run.stdout.rsplit("GROWTH", 1)[1])


def test_sparse_member_shard_is_refused_without_expanding(tmp_path):
    data = sparse_member_tar("bag-000.feats.npy")
    assert len(data) < 4096
    root = str(tmp_path / "ds")
    write_raw_dataset(root, [(data, [("bag-000", 0, 3)])])
    with pytest.raises(BadSampleError, match=r"sparse.*\[sparse_member\]"):
        list(read_shard(f"{root}/train-000000.tar", dim=DIM, n_classes=2))
    assert index_tar(io.BytesIO(data), "s.tar").cut.reason == "sparse_member"  # the streaming loader's reader
    # verify and the memory loader, in a fresh process: peak memory stays far below what it declares.
    out, growth = _peak_rss_growth_mib("from aem_dist.data.verify import verify_dataset", f"print(verify_dataset({root!r}, progress=False).text())")
    assert "[sparse_member]" in out
    assert growth < 100, f"peak RSS grew by {growth:.0f} MiB"


def test_long_extension_header_is_refused():
    info = tarfile.TarInfo("x.json")
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_LONGNAME
    header[124:136] = tarfile.itn(1 << 40, 12, tarfile.GNU_FORMAT)  # a 1 TiB "long name"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    data = bytes(header[:512]) + b"\0" * 1024
    with pytest.raises(BadSampleError, match="tar_header_size"):
        list(read_shard_bytes(data))


def read_shard_bytes(data: bytes):
    from aem_dist.data.shards import iter_tar_samples

    return iter_tar_samples(io.BytesIO(data), "s.tar")


def test_npy_header_declaring_more_than_it_holds():
    blob = npy(np.zeros((3, 4), np.float16))
    forged = blob.replace(b"(3, 4)", b"(9999999999, 4)")
    with pytest.raises(BadSampleError, match=r"declares shape \(9999999999, 4\).*\[npy_size\]"):
        load_npy(forged, "feats.npy")


def test_huge_shape_h5_is_refused_before_reading(tmp_path):
    import h5py

    folder = tmp_path / "h5"
    folder.mkdir()
    with h5py.File(folder / "big.h5", "w") as f:  # declared, never written: a few KB on disk
        f.create_dataset("features", shape=(800_000, 1024), dtype="float32", chunks=(1000, 1024))
    with h5py.File(folder / "huge.h5", "w") as f:
        f.create_dataset("features", shape=(10**9, 4096), dtype="float32", chunks=(1, 4096))
    assert (folder / "big.h5").stat().st_size < 10_000
    out, growth = _peak_rss_growth_mib(
        "from aem_dist.data.sources import SourceError, open_source",
        textwrap.dedent(f"""
        src = open_source("clam", {str(folder)!r})
        for sid in src.slide_ids():
            try:
                src.load(sid)
            except SourceError as err:
                print("REFUSED", err)
        """),
    )
    assert "big.h5: 'features' declares shape (800000, 1024) but only 0 of its 800 chunks are stored" in out
    assert "huge.h5: 'features' declares 1,000,000,000 instances, above data.max_instances_per_bag" in out
    assert growth < 100, f"peak RSS grew by {growth:.0f} MiB"


def test_zarr_with_missing_chunks_is_refused(tmp_path):
    import zarr

    from aem_dist.data.sources import SourceError, open_source

    root = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    g = root.create_group("slide1")
    g.create_array("features", shape=(200_000, 512), chunks=(1000, 512), dtype="float32")
    g.attrs["label"] = 1
    with pytest.raises(SourceError, match=r"only 0 of its 200 chunks are stored"):
        open_source("zarr", str(tmp_path / "z.zarr")).load("slide1")


def _manifest_text(tmp_path, **changes) -> str:
    root = str(tmp_path / "ds")
    write_tiny(root, n_train=2, n_val=1, shard_bytes=1 << 20)
    data = json.loads(open(f"{root}/manifest.json").read())
    for dotted, value in changes.items():
        node = data
        *parts, last = dotted.split("/")
        for p in parts:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return json.dumps(data)


def test_manifest_dim_and_counts_are_bounded(tmp_path):
    with pytest.raises(ManifestError, match=r"feature dim 1,000,000,000, above data.max_dim"):
        parse_manifest(_manifest_text(tmp_path, dim=10**9))
    text = _manifest_text(tmp_path)
    with pytest.raises(ManifestError, match=r"max_instances_per_bag = 2"):
        parse_manifest(text, limits=Limits(max_instances_per_bag=2))
    assert parse_manifest(text).dim == DIM


@pytest.mark.parametrize("name", ["../outside.tar", "/dev/zero", "..", "sub/train-0.tar", "a\x1b[2Jb.tar", ".hidden.tar", "-rf.tar"])
def test_shard_names_must_be_one_safe_segment(tmp_path, name):
    text = _manifest_text(tmp_path, **{"splits/train/shards/0/name": name})
    with pytest.raises(ManifestError) as err:
        parse_manifest(text)
    message = str(err.value)
    assert "not a plain file name" in message and repr(name) in message and "\x1b" not in message


def test_shard_resolving_to_a_device_is_not_read(tmp_path):
    root = tmp_path / "ds"
    manifest = write_tiny(str(root), n_train=2, n_val=1, shard_bytes=1 << 20)
    shard = manifest.splits["train"].shards[0].name
    (root / shard).unlink()
    (root / shard).symlink_to("/dev/zero")  # would read forever
    with pytest.raises(BadSampleError, match=r"not a regular file.*\[not_regular_file\]"):
        list(read_shard(str(root / shard), dim=DIM, n_classes=len(CLASSES)))
    report = verify_dataset(str(root), progress=False)
    assert not report.ok and "[not_regular_file]" in report.text()


def test_heatmap_coordinates_are_bounded():
    from aem_dist.observe.attention import BagResult
    from aem_dist.observe.heatmap import render

    coords = np.array([[0, 0], [1, 0], [10**9, 10**9]], dtype=np.int64)
    bag = BagResult("s", "s", "test", 0, np.array([0.5, 0.5]), np.full(3, 1 / 3), coords)
    with pytest.raises(SizeError, match=r"grid of patches"):
        render(bag)


def test_good_data_still_reads(tmp_path):
    root = str(tmp_path / "ds")
    manifest = write_tiny(root, n_train=3, n_val=1, shard_bytes=1 << 20)
    bags = list(read_shard(f"{root}/{manifest.splits['train'].shards[0].name}", dim=DIM, n_classes=2))
    assert [b.key for b in bags] == [tiny_bag(i).key for i in range(3)]
    assert load_manifest(root).dim == DIM
    assert members_of(bags[0]) and tar_bytes(members_of(bags[0]))


def test_ingest_limits_are_configurable(tmp_path):
    import h5py

    folder = tmp_path / "h5"
    folder.mkdir()
    for sid in ("s1", "s2"):
        with h5py.File(folder / f"{sid}.h5", "w") as f:
            f["features"] = np.ones((5, DIM), np.float32)
    (tmp_path / "labels.csv").write_text("slide_id,label,split\ns1,0,train\ns2,1,train\n")
    cmd = [sys.executable, "-m", "aem_dist", "ingest", "--format", "clam", "--src", str(folder), "--labels", str(tmp_path / "labels.csv"),
           "--out", str(tmp_path / "ds"), "--max-instances-per-bag", "4"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "declares 5 instances, above data.max_instances_per_bag = 4" in run.stderr and "Traceback" not in run.stderr
