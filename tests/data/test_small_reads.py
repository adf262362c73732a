"""Small files are read through storage.read_bytes everywhere (regular files only, a stated cap), and
bad ones are one line naming the file: a labels CSV that is a fifo or /dev/zero, a control character
in a label (before: shards written, no manifest, a traceback), a garbage run.json (before: a
JSONDecodeError traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from aem_dist import storage
from aem_dist.data.sources import SourceError
from aem_dist.data.sources.labels import read_labels
from aem_dist.engine.runrecord import recorded_config


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aem_dist", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_labels_csv_that_is_no_file_is_refused_at_once(tmp_path, kind):
    path = tmp_path / "labels.csv"
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    with pytest.raises(SourceError, match="labels.csv: cannot read labels CSV: .*not a regular file"):
        read_labels(str(path))


def test_control_character_in_a_label_is_one_line_before_any_shard(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    for i in range(3):
        with h5py.File(src / f"s{i}.h5", "w") as f:
            f["features"] = np.ones((4, 3), np.float32)
    (tmp_path / "l.csv").write_text("slide_id,label\ns0,a\ns1,tu\x1bmor\ns2,a\n")
    proc = cli("ingest", "-f", "clam", "--src", str(src), "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'l.csv'}:3: label 'tu\\x1bmor' holds a control character ('\\x1b'); fix the file"]
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True


def test_garbage_run_json_is_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_bytes(b"\x00garbage{")
    with pytest.raises(storage.StorageError, match=r"run.json: not a valid run record \(run.json\) \(not JSON"):
        recorded_config(str(out))
    (out / "run.json").write_text("[1, 2]")
    with pytest.raises(storage.StorageError, match="a JSON list, not an object"):
        recorded_config(str(out))
    (out / "run.json").write_bytes(b"\x00garbage{")
    proc = cli("report", str(out))  # the first reader of run.json a user meets
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out / 'run.json'}: not a valid record file (not JSON: "), lines
