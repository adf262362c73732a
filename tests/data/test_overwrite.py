"""`synth`/`ingest` into an existing dataset: refused without --overwrite (before any slide is read);
with it the old manifest goes first, so a SIGKILL mid-rewrite leaves visibly no dataset — never the
old manifest over new shards (before: 17 of 88 shards failed sha256 under the old manifest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from aem_dist.data.manifest import ManifestError, load_manifest
from aem_dist.data.shards import DatasetExists, write_dataset
from aem_dist.data.verify import verify_dataset
from tests.data.helpers import CLASSES, DIM, tiny_bag, write_tiny


def test_existing_dataset_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    root = tmp_path / "ds"
    old = write_tiny(str(root), n_train=12, n_val=5)
    (root / "notes.txt").write_text("the team's notes")
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(DatasetExists, match=r"already holds a dataset \(manifest.json\); pass --overwrite"):
        write_dataset(str(root), [("train", tiny_bag(i)) for i in range(2)], DIM, CLASSES, overwrite=False)  # the CLI's default
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # nothing touched
    new = write_dataset(str(root), [("train", tiny_bag(i)) for i in range(2)], DIM, CLASSES, shard_bytes=400, overwrite=True)
    names = {s.name for e in new.splits.values() for s in e.shards}
    assert len(names) < len({s.name for e in old.splits.values() for s in e.shards})
    assert {p.name for p in root.glob("*.tar")} == names  # the old dataset's other shards are gone
    assert (root / "notes.txt").read_text() == "the team's notes" and verify_dataset(str(root), progress=False).ok


def test_cli_synth_and_ingest_refuse_in_one_line(tmp_path):
    root = tmp_path / "ds"
    write_tiny(str(root))
    for args in (["synth", "--out", str(root)], ["ingest", "-f", "clam", "--src", str(tmp_path / "no-such-src"), "--out", str(root)]):
        proc = subprocess.run([sys.executable, "-m", "aem_dist", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: {root} already holds a dataset (manifest.json); pass --overwrite to replace it"]


def test_sigkill_during_a_rewrite_leaves_no_manifest(tmp_path):
    root = tmp_path / "ds"
    write_tiny(str(root), n_train=12, n_val=5)
    code = textwrap.dedent(f"""
        import os, signal
        from aem_dist.data.shards import write_dataset
        from tests.data.helpers import CLASSES, DIM, tiny_bag

        def bags():
            for i in range(40):
                if i == 20:  # several new shards are committed by now
                    os.kill(os.getpid(), signal.SIGKILL)
                yield "train", tiny_bag(i + 50)

        write_dataset({str(root)!r}, bags(), DIM, CLASSES, shard_bytes=400, overwrite=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not (root / "manifest.json").exists()
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(str(root))
    assert not verify_dataset(str(root), progress=False).readable
