"""`predict --out` is additive: it writes a new store, or replaces one it wrote before, and refuses in
one line a location holding anything else (the current directory, a run folder, a bucket) — before,
the store was opened with mode="w", which emptied the location first."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from aem_dist.observe.attention import AttentionStore, AttentionStoreError, BagResult, write_attention


def bags(n: int = 3) -> list[BagResult]:
    return [BagResult(f"s{i}", f"s{i}", "test", i % 2, np.array([0.4, 0.6]), np.full(4, 0.25), np.zeros((4, 2), np.int32)) for i in range(n)]


def test_a_run_folder_or_a_folder_with_files_is_refused_and_kept(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "state.pt").write_bytes(b"checkpoint")
    (run / "results.json").write_text("{}")
    with pytest.raises(AttentionStoreError, match=r"holds 2 entries that are not an attention store written by predict \(best, results.json\)"):
        write_attention(str(run), bags(), class_names=["a", "b"])
    assert (run / "best" / "state.pt").read_bytes() == b"checkpoint" and (run / "results.json").exists()
    (tmp_path / "plain.txt").write_text("mine")
    with pytest.raises(AttentionStoreError, match="a file is there"):
        write_attention(str(tmp_path / "plain.txt"), bags(), class_names=["a", "b"])
    assert (tmp_path / "plain.txt").read_text() == "mine"


def test_a_store_of_ours_is_replaced_but_not_with_a_foreign_file_inside(tmp_path):
    out = tmp_path / "att.zarr"
    write_attention(str(out), bags(3), class_names=["a", "b"])
    write_attention(str(out), bags(2), class_names=["a", "b"])  # predict again into its own store: replaced
    assert len(AttentionStore(str(out))) == 2
    (out / "notes.md").write_text("someone's notes")
    with pytest.raises(AttentionStoreError, match=r"notes\.md"):
        write_attention(str(out), bags(2), class_names=["a", "b"])
    assert (out / "notes.md").exists() and len(AttentionStore(str(out))) == 2
    (tmp_path / "empty").mkdir()
    write_attention(str(tmp_path / "empty"), bags(1), class_names=["a", "b"])  # an empty folder is fine


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aem_dist", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_predict_out_dot_refuses_before_any_work_and_deletes_nothing(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run_cli("predict", "--run", str(tmp_path / "no-such-run"), "--out", ".", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "precious.txt" in proc.stderr and "never deletes what it did not write" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    # predictions.csv beside the store: a foreign file of that name is not replaced either
    (tmp_path / "table.csv").write_text("name,value\nx,1\n")
    proc = run_cli("predict", "--run", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "new.zarr"), "--csv", str(tmp_path / "table.csv"), cwd=tmp_path)
    assert proc.returncode == 2 and "not a predictions.csv" in proc.stderr, proc.stderr
    assert (tmp_path / "table.csv").read_text() == "name,value\nx,1\n" and not (tmp_path / "new.zarr").exists()


@pytest.mark.integration
def test_s3_bucket_or_prefix_with_objects_is_refused_and_kept(observe_s3):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=observe_s3.endpoint, key=observe_s3.key, secret=observe_s3.secret, skip_instance_cache=True)
    fs.pipe_file(f"{observe_s3.bucket}/data/manifest.json", b"{}")
    for url in (f"s3://{observe_s3.bucket}", f"s3://{observe_s3.bucket}/data"):
        with pytest.raises(AttentionStoreError, match="not an attention store written by predict"):
            write_attention(url, bags(), class_names=["a", "b"])
    assert fs.cat_file(f"{observe_s3.bucket}/data/manifest.json") == b"{}"
    url = f"s3://{observe_s3.bucket}/pred/att.zarr"
    write_attention(url, bags(2), class_names=["a", "b"])
    write_attention(url, bags(1), class_names=["a", "b"])  # its own store: replaced
    assert len(AttentionStore(url)) == 1 and fs.cat_file(f"{observe_s3.bucket}/data/manifest.json") == b"{}"
