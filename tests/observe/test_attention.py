"""Attention export: zarr round-trip (local and s3://), the CLI, heatmaps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aem_dist.data.loader import read_split
from aem_dist.data.manifest import load_manifest
from aem_dist.data.synthetic import unpack_mask
from aem_dist.observe.attention import AttentionStore, AttentionStoreError, load_run_model, predict_split, write_attention
from aem_dist.observe.heatmap import patch_grid, render_store, scaled, tumour_attention_auc

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tiny_sweep):
    """The λ = 0.1, seed 0 trial's model and its predictions on val and test."""
    name = next(n for n, t in tiny_sweep.trials.items() if t["lam"] == 0.1 and t["seed"] == 0)
    run = load_run_model(tiny_sweep.trials[name]["path"])
    bags = []
    for split in ("val", "test"):
        bags += predict_split(run, tiny_sweep.data, split, max_instances=2048, max_bags=8, progress=False)
    return run, bags


def check_store(store: AttentionStore, data_root: str, predicted) -> None:
    """Every instance of every bag, sums to 1 per bag, coords aligned with the dataset."""
    manifest = load_manifest(data_root)
    dataset = {b.key: b for split in ("val", "test") for b in read_split(data_root, manifest, split)}
    assert len(store) == len(dataset) == manifest.splits["val"].n_bags + manifest.splits["test"].n_bags
    assert set(store.keys) == set(dataset)
    assert store.offsets[0] == 0 and store.offsets[-1] == sum(b.n for b in dataset.values()) == store.attrs["n_instances"]
    assert store.attrs["class_names"] == manifest.class_names and store.has_tumour
    by_key = {p.key: p for p in predicted}
    for i, bag in enumerate(store):
        src = dataset[bag.key]
        assert bag.slide_id == src.slide_id and bag.label == src.label and bag.split in ("val", "test")
        assert len(bag.attention) == src.n and bag.coords.shape == (src.n, 2)
        assert bag.attention.dtype == np.float32 and np.all(bag.attention >= 0)
        assert float(bag.attention.astype(np.float64).sum()) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_array_equal(bag.coords, src.coords)  # row i of attention is instance i of the bag
        np.testing.assert_array_equal(bag.tumour, unpack_mask(src.meta["tumour_mask_bits"], src.n))
        np.testing.assert_allclose(bag.attention, by_key[bag.key].attention, rtol=1e-6, atol=1e-9)
        assert bag.probs.sum() == pytest.approx(1.0, abs=1e-5) and store.preds[i] == int(np.argmax(bag.probs))
    # the pooled bag embeddings (abmil's z) are stored next to attention, in store order
    emb = store.embeddings()
    assert emb is not None and emb.shape == (len(store), by_key[store.keys[0]].embedding.shape[0]) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, np.stack([by_key[k].embedding for k in store.keys]), rtol=1e-6)


def test_zarr_round_trip_local(trained, tiny_sweep, tmp_path):
    run, bags = trained
    out = str(tmp_path / "attention.zarr")
    write_attention(out, bags, class_names=run.meta["class_names"], attrs={"run": "r"})
    store = AttentionStore(out)
    assert store.attrs["complete"] is True and store.attrs["splits"] == ["test", "val"]
    check_store(store, tiny_sweep.data, bags)


def test_incomplete_or_foreign_store_is_refused(trained, tmp_path):
    import zarr

    run, bags = trained
    out = tmp_path / "a.zarr"
    write_attention(str(out), bags[:2], class_names=run.meta["class_names"])
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["complete"] = False  # what a reader sees while (or after) a write was interrupted
    with pytest.raises(AttentionStoreError, match="incomplete"):
        AttentionStore(str(out))
    with pytest.raises(AttentionStoreError, match="not an attention store"):
        AttentionStore(str(tmp_path / "missing.zarr"))


def test_attention_lights_up_the_tumour(trained):
    """On tumour slides the trained model's attention ranks tumour patches above the rest."""
    _, bags = trained
    aucs = [tumour_attention_auc(b) for b in bags if b.label == 1]
    aucs = [a for a in aucs if not np.isnan(a)]
    assert len(aucs) >= 10
    assert np.mean(aucs) > 0.75, np.mean(aucs)


@pytest.mark.integration
def test_zarr_round_trip_on_s3(trained, tiny_sweep, observe_s3):
    run, bags = trained
    url = f"s3://{observe_s3.bucket}/predictions/attention.zarr"
    write_attention(url, bags, class_names=run.meta["class_names"])
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=observe_s3.endpoint, key=observe_s3.key, secret=observe_s3.secret, skip_instance_cache=True)
    assert fs.exists(f"{observe_s3.bucket}/predictions/attention.zarr/zarr.json")
    check_store(AttentionStore(url), tiny_sweep.data, bags)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aem_dist", *args], capture_output=True, text=True, timeout=300)


def test_predict_and_heatmap_cli(tiny_sweep, tmp_path):
    trial = tiny_sweep.trials["trial_0002"]["path"]
    out = tmp_path / "att.zarr"
    proc = run_cli("predict", "--run", trial, "--data", tiny_sweep.data, "--out", str(out), "--split", "test")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 48 bags" in proc.stdout
    assert "predict test" in proc.stderr and "bag/s" in proc.stderr  # the progress bar with its rate
    store = AttentionStore(str(out))
    assert len(store) == 48 and store.attrs["model"] == "abmil" and store.attrs["checkpoint_epoch"] >= 0

    pick = [store.slide_ids[i] for i in range(len(store)) if store.labels[i] == 1][:2] + [store.slide_ids[int(np.argmin(store.labels))]]
    proc = run_cli("heatmap", "--attention", str(out), "--out", str(tmp_path / "heat"), *[a for s in pick for a in ("--bags", s)])
    assert proc.returncode == 0, proc.stderr
    pngs = sorted((tmp_path / "heat").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(pick)
    assert all(p.read_bytes().startswith(PNG) and p.stat().st_size > 15_000 for p in pngs)

    proc = run_cli("heatmap", "--attention", str(out), "--out", str(tmp_path / "heat"), "--bags", "no-such-slide")
    assert proc.returncode == 2 and "no bag 'no-such-slide'" in proc.stderr


def test_heatmap_pixels_follow_attention(trained, tmp_path):
    """The rendered image is the attention painted on the patch grid (checked on the grid, not the PNG)."""
    _, bags = trained
    bag = next(b for b in bags if b.label == 1 and b.tumour.sum() > 3)
    cells, patch = patch_grid(bag.coords)
    assert patch == 256 and cells.min() == 0
    assert len({tuple(c) for c in cells}) == len(cells)  # one patch per cell
    values, _, (lo, hi) = scaled(bag.attention, "rank")
    assert lo == 0 and hi == 1 and values[np.argmax(bag.attention)] == 1.0 and values[np.argmin(bag.attention)] == 0.0
    v, _, _ = scaled(np.full(10, 0.1), "log")
    assert np.allclose(v, 0.0)  # uniform attention sits at 0 on the log scale


def test_render_store_all_scales(trained, tmp_path):
    run, bags = trained
    out = str(tmp_path / "a.zarr")
    write_attention(out, bags[:3], class_names=run.meta["class_names"])
    for scale in ("rank", "linear", "log"):
        written = render_store(out, str(tmp_path / scale), scale=scale, limit=2, progress=False)
        assert len(written) == 2 and all(Path(w).read_bytes().startswith(PNG) for w in written)
    with pytest.raises(ValueError, match="unknown heatmap scale"):
        render_store(out, str(tmp_path / "x"), scale="sqrt")


def test_heatmap_refuses_bags_without_coords(trained, tmp_path):
    """A bag ingested without coords (stored as zeros) has nothing to paint: named, it is refused in one
    line; among others it is left out with a warning; a store without any coords is refused."""
    import dataclasses

    run, bags = trained
    flat = [dataclasses.replace(b, coords=np.zeros_like(b.coords)) for b in bags[:2]]
    out = str(tmp_path / "mixed.zarr")
    write_attention(out, [*flat, bags[2]], class_names=run.meta["class_names"])
    with pytest.raises(ValueError, match=rf"1 slide\(s\) have no patch coordinates \('{flat[0].slide_id}'\).*ingested without coords") as err:
        render_store(out, str(tmp_path / "one"), bags=[flat[0].slide_id], progress=False)
    assert "\n" not in str(err.value)
    written = render_store(out, str(tmp_path / "all"), progress=False)
    assert [Path(w).stem for w in written] == [bags[2].slide_id]
    none = str(tmp_path / "none.zarr")
    write_attention(none, flat, class_names=run.meta["class_names"])
    with pytest.raises(ValueError, match="2 slide\\(s\\) have no patch coordinates"):
        render_store(none, str(tmp_path / "none"), progress=False)
