"""`--checkpoint last` reads only from inside the run: a symlinked epoch folder (or state.pt) leading
out of it is refused by name (before: followed, and the outside checkpoint loaded as the run's)."""

from __future__ import annotations

import pytest

from aem_dist.observe.attention import resolve_checkpoint


def test_symlinked_epoch_folder_out_of_the_run_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "epoch-000009"
    elsewhere.mkdir(parents=True)
    (elsewhere / "state.pt").write_bytes(b"not ours")
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-000001").mkdir(parents=True)
    (run / "checkpoints" / "epoch-000001" / "state.pt").write_bytes(b"ours")
    assert resolve_checkpoint(str(run), "last").endswith("epoch-000001")
    (run / "checkpoints" / "epoch-000009").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=r"epoch-000009: leads out of the run folder"):
        resolve_checkpoint(str(run), "last")
    (run / "checkpoints" / "epoch-000009").unlink()
    (run / "checkpoints" / "epoch-000002").mkdir()
    (run / "checkpoints" / "epoch-000002" / "state.pt").symlink_to(elsewhere / "state.pt")
    with pytest.raises(ValueError, match=r"state.pt: leads out of the run folder"):
        resolve_checkpoint(str(run), "epoch-2")
