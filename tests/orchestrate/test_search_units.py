"""Search and scheduler pieces without a Ray cluster: trial naming and its record, what Tune pickles,
ASHA's progress key, and seeded searchers drawing the same points."""

import json
import pickle
from types import SimpleNamespace

import pytest

from aem_dist.config import load_config
from aem_dist.orchestrate.search import EarlyStopRecorder, SampleBook, make_scheduler, make_searcher, optuna_seed, tune_space
from aem_dist.orchestrate.trials import PROGRESS_KEY, SCORE_KEY, progress_metrics, sample_name
from aem_dist.storage import StorageOptions

SPACE = "sweep.space={loss.lam: {loguniform: [1.0e-4, 1]}, model.hidden: {randint: [8, 64]}, loss.kind: {choice: [neg_entropy, kl_uniform]}}"


def _cfg(kind="random", *more):
    return load_config(None, [f"sweep.search={kind}", "sweep.num_samples=6", "sweep.search_seed=7", SPACE, *more])


def _trial(values):
    return SimpleNamespace(config=dict(values))


def test_book_names_records_and_renames_drawn_points(tmp_path):
    cfg = _cfg()
    options = StorageOptions()
    book = SampleBook.load(cfg, str(tmp_path), options)
    namer = book.namer()
    a = {"loss.lam": 0.0123456, "model.hidden": 9, "loss.kind": "kl_uniform"}
    b = {"loss.lam": 0.5, "model.hidden": 9, "loss.kind": "kl_uniform"}
    assert namer(_trial(a)) == "s000_kind=kl_uniform_lam=0.01235_hidden=9" == sample_name(0, a)
    assert namer(_trial(a)) == "s001_kind=kl_uniform_lam=0.01235_hidden=9"  # the same point drawn twice: its own trial
    assert namer(_trial(b)).startswith("s002_")
    record = json.loads((tmp_path / "search.json").read_text())
    assert [s["values"] for s in record["samples"]] == [a, a, b] and record["search"] == "random" and record["search_seed"] == 7
    # Tune deep-copies and pickles the namer: it carries a token, not the book or its storage options
    assert pickle.loads(pickle.dumps(namer)) == namer and "token" in vars(namer) and len(vars(namer)) == 1
    book.close()

    again = SampleBook.load(cfg, str(tmp_path), options)  # a resumed sweep: drawn points get their names back
    namer = again.namer()
    assert [namer(_trial(b)), namer(_trial(a)), namer(_trial(a))] == ["s002_kind=kl_uniform_lam=0.5_hidden=9", "s000_kind=kl_uniform_lam=0.01235_hidden=9", "s001_kind=kl_uniform_lam=0.01235_hidden=9"]
    assert namer(_trial(b)).startswith("s003_")
    again.close()
    with pytest.raises(Exception, match="closed"):
        namer(_trial(a))


def test_a_torn_record_is_a_clear_error(tmp_path):
    (tmp_path / "search.json").write_text("{not json")
    with pytest.raises(Exception, match=r"search\.json is not a search record"):
        SampleBook.load(_cfg(), str(tmp_path), StorageOptions())


def test_a_record_of_another_search_is_refused(tmp_path):
    book = SampleBook.load(_cfg(), str(tmp_path), StorageOptions())
    namer = book.namer()
    for lam in (0.1, 0.2, 0.3):
        namer(_trial({"loss.lam": lam, "model.hidden": 9, "loss.kind": "neg_entropy"}))
    book.close()
    assert len(SampleBook.load(_cfg("random", "sweep.num_samples=9"), str(tmp_path), StorageOptions()).samples) == 3  # a search may grow
    with pytest.raises(Exception, match=r"other sweep\.search_seed than this config"):
        SampleBook.load(_cfg("random", "sweep.search_seed=8"), str(tmp_path), StorageOptions())
    with pytest.raises(Exception, match=r"other sweep\.search, sweep\.search_seed than this config"):
        SampleBook.load(_cfg("optuna", "sweep.search_seed=8"), str(tmp_path), StorageOptions())
    with pytest.raises(Exception, match=r"records 3 points drawn, more than sweep\.num_samples=2"):
        SampleBook.load(_cfg("random", "sweep.num_samples=2"), str(tmp_path), StorageOptions())


def test_recorder_pickles_without_storage_options(tmp_path):
    rec = EarlyStopRecorder(_cfg("random", "storage.key=KEYID", "storage.secret=VERYSECRET"), str(tmp_path), StorageOptions())
    blob = pickle.dumps(rec)
    assert b"VERYSECRET" not in blob and b"KEYID" not in blob and pickle.loads(blob).options is None


def test_asha_never_sees_progress_of_the_last_epoch():
    assert [PROGRESS_KEY in progress_metrics({}, e, 3) for e in range(3)] == [True, True, False]
    assert progress_metrics({}, 1, 3)[PROGRESS_KEY] == 2
    sched = make_scheduler(load_config(None, ["sweep.scheduler=asha", "train.epochs=9", "sweep.asha_grace_period=1", "sweep.asha_reduction_factor=3"]))
    assert (sched._time_attr, sched.metric, sched._mode, sched._max_t) == (PROGRESS_KEY, SCORE_KEY, "max", 9)
    assert [m for m, _ in sched._brackets[0]._rungs] == [9, 3, 1]  # 9 = max_t is never reached: no progress at the last epoch
    assert make_scheduler(load_config(None, [])) is None


def _optuna_points(cfg, drawn=()):
    searcher, limit = make_searcher(cfg, list(drawn), 1)
    assert limit == 1  # OptunaSearch leaves the concurrency limit to Tune
    searcher.set_search_properties(None, None, tune_space(cfg.sweep.space))
    return [searcher.suggest(f"t{i}") for i in range(6)]


def test_optuna_with_the_same_seed_draws_the_same_points():
    cfg = _cfg("optuna")
    first, second = _optuna_points(cfg), _optuna_points(cfg)
    assert first == second and len({p["loss.lam"] for p in first}) == 6
    for p in first:
        assert 1e-4 <= p["loss.lam"] <= 1 and 8 <= p["model.hidden"] < 64 and p["loss.kind"] in ("neg_entropy", "kl_uniform")
    assert _optuna_points(_cfg("optuna", "sweep.search_seed=8")) != first
    assert optuna_seed(7, 0) == 7 and optuna_seed(7, 3) == optuna_seed(7, 3) != optuna_seed(7, 4)


def test_optuna_resubmits_drawn_points_first():
    from aem_dist.orchestrate.search import Sample

    cfg = _cfg("optuna")
    drawn = [Sample("s000", {"loss.lam": 0.25, "model.hidden": 12, "loss.kind": "neg_entropy"})]
    points = _optuna_points(cfg, drawn)
    assert points[0] == drawn[0].values and points[1] not in (drawn[0].values,)
