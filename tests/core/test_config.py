import pytest

from aem_dist.config import ConfigError, config_with, describe_keys, list_packaged, load_config, parse_overrides


def test_defaults_and_overrides():
    cfg = load_config(None, ["loss.lam=0.1", "model.name=mha", "train.max_instances_per_batch=5000", "sweep.grid={loss.lam: [0, 0.1]}"])
    assert cfg.loss.lam == 0.1
    assert cfg.model.name == "mha"
    assert cfg.train.max_instances_per_batch == 5000
    assert cfg.sweep.grid == {"loss.lam": [0, 0.1]}
    assert cfg.train.max_bags_per_batch == 1  # the paper's setting by default


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.lamda=0.1", "loss.lamda"),
        ("nosection.x=1", "nosection.x"),
        ("loss.lam=-1", "loss.lam"),
        ("loss.kind=entropy", "loss.kind"),
        ("train.epochs=zero", "train.epochs"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(path)


def test_unknown_grid_key_is_an_error():
    with pytest.raises(ConfigError, match=r"loss\.lamb"):
        load_config(None, ["sweep.grid={loss.lamb: [0, 1]}"])


def test_override_syntax():
    assert parse_overrides(["a.b=1", "c.d=[1, 2]", "e.f=true", "g.h=abc"]) == {"a.b": 1, "c.d": [1, 2], "e.f": True, "g.h": "abc"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["loss.lam"])


@pytest.mark.parametrize("name, lam", [("camelyon16", 0.005), ("camelyon17", 0.1), ("lbc", 0.1)])
def test_paper_configs_carry_paper_defaults(name, lam):
    cfg = load_config(name)
    assert cfg.loss.lam == lam
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.weight_decay, cfg.model.hidden) == (50, 1e-4, 1e-4, 128)
    assert cfg.train.max_bags_per_batch == 1
    assert cfg.train.select_metric == "auc+f1"
    assert cfg.loss.kind == "neg_entropy"


def test_every_packaged_config_loads():
    for name in list_packaged():
        load_config(name)


def test_config_with_applies_trial_values_and_keeps_secrets():
    base = load_config(None, ["storage.secret=s3cr3t"])
    trial = config_with(base, {"loss.lam": 0.5, "train.seed": 3})
    assert (trial.loss.lam, trial.train.seed) == (0.5, 3)
    assert trial.storage.secret.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in str(trial.to_dict())


def test_every_key_is_documented():
    rows = describe_keys()
    assert {"data.root", "loss.lam", "loss.kind", "train.max_instances_per_batch"} <= {k for k, _, _ in rows}
    assert all(text for _, _, text in rows)


def test_run_record_masks_credentials(monkeypatch):
    from aem_dist.engine.results import run_record
    from aem_dist.storage import StorageOptions

    monkeypatch.setattr("sys.argv", ["aem-dist", "train", "--set", "storage.secret=hunter22", "--set", "storage.key=AKIAEXAMPLE"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-123456")
    cfg = load_config(None, ["storage.secret=hunter22", "storage.key=AKIAEXAMPLE"])
    text = str(run_record(cfg, "train", StorageOptions.from_config(cfg.storage)))
    for secret in ("hunter22", "AKIAEXAMPLE", "tok-123456"):
        assert secret not in text


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=data/x", "data.cache_dir=cache", "run.storage_path=runs"])
    assert (cfg.data.root, cfg.data.cache_dir, cfg.run.storage_path) == (str(tmp_path / "data/x"), str(tmp_path / "cache"), str(tmp_path / "runs"))
    assert load_config(None, ["data.root=s3://bucket/x"]).data.root == "s3://bucket/x"
