"""sweep.search / sweep.space / sweep.num_samples / sweep.scheduler: validation errors name the key."""

import pytest

from aem_dist.config import ConfigError, check_sweep_space, load_config, space_points

SEARCH = ["sweep.search=random", "sweep.num_samples=6"]


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_distributions_are_normalised():
    cfg = _cfg(*SEARCH, "sweep.space={loss.lam: {loguniform: [1e-4, 1]}, train.seed: {randint: [0, 3]}, loss.kind: {choice: [neg_entropy, kl_uniform]}, train.lr: {uniform: [1.0e-4, 2.0e-4]}}")
    # YAML reads 1e-4 as text: the bound becomes a number
    assert cfg.sweep.space == {"loss.lam": {"loguniform": [1e-4, 1.0]}, "train.seed": {"randint": [0, 3]}, "loss.kind": {"choice": ["neg_entropy", "kl_uniform"]}, "train.lr": {"uniform": [1e-4, 2e-4]}}
    assert {"train.seed": 2} in space_points(cfg) and {"loss.kind": "kl_uniform"} in space_points(cfg)
    assert check_sweep_space(cfg) == 8


@pytest.mark.parametrize(
    "space, message",
    [
        ("{loss.lam: {logunifrom: [1.0e-4, 1]}}", r"sweep\.space\['loss\.lam'\]: unknown distribution 'logunifrom'"),
        ("{loss.lam: {loguniform: [0, 1]}}", r"sweep\.space\['loss\.lam'\]: loguniform needs 0 < low"),
        ("{loss.lam: {uniform: [1, 0.5]}}", r"sweep\.space\['loss\.lam'\]: uniform needs finite low < high"),
        ("{loss.lam: {uniform: [0, 1, 2]}}", r"sweep\.space\['loss\.lam'\]: uniform needs \[low, high\]"),
        ("{loss.lam: {uniform: [a, 1]}}", r"sweep\.space\['loss\.lam'\]: uniform bounds must be numbers"),
        ("{train.seed: {randint: [0, 2.5]}}", r"sweep\.space\['train\.seed'\]: randint bounds must be integers"),
        ("{loss.kind: {choice: []}}", r"sweep\.space\['loss\.kind'\]: choice needs a list"),
        ("{loss.lam: [0, 1]}", r"sweep\.space\['loss\.lam'\] must be one distribution"),
        ("{loss.lam: {uniform: [0, 1], loguniform: [1, 2]}}", r"sweep\.space\['loss\.lam'\] must be one distribution"),
        ("{loss.lamb: {uniform: [0, 1]}}", r"sweep\.space: unknown config key 'loss\.lamb'"),
    ],
)
def test_bad_distribution_names_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*SEARCH, f"sweep.space={space}")


def test_bound_the_key_cannot_take_names_it():
    cfg = _cfg(*SEARCH, "sweep.space={loss.lam: {uniform: [-1, 1]}}")
    with pytest.raises(ConfigError, match=r"sweep\.space\['loss\.lam'\] value -1\.0: loss\.lam"):
        check_sweep_space(cfg)
    with pytest.raises(ConfigError, match=r"sweep\.space\['loss\.kind'\] value 'entropy'"):
        check_sweep_space(_cfg(*SEARCH, "sweep.space={loss.kind: {choice: [neg_entropy, entropy]}}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sweep.space={loss.lam: {uniform: [0, 1]}}"], r"sweep\.space holds distributions \(loss\.lam\) but sweep\.search is 'grid'"),
        (["sweep.num_samples=4"], r"sweep\.num_samples is for sweep\.search=random or optuna"),
        (["sweep.search=random", "sweep.space={loss.lam: {uniform: [0, 1]}}"], r"sweep\.search=random needs sweep\.num_samples >= 1"),
        (["sweep.search=optuna", "sweep.num_samples=0", "sweep.space={loss.lam: {uniform: [0, 1]}}"], r"sweep\.search=optuna needs sweep\.num_samples >= 1"),
        (["sweep.search=optuna", "sweep.num_samples=3"], r"sweep\.search=optuna needs sweep\.space"),
        (["sweep.search=random", "sweep.num_samples=3", "sweep.space={loss.lam: {uniform: [0, 1]}}", "sweep.grid={train.seed: [0, 1]}"], r"sweep\.grid must be empty"),
        (["sweep.search=optuna", "sweep.num_samples=3", "sweep.space={loss.lam: {uniform: [0, 1]}}", "train.select_metric=last"], r"sweep\.search=optuna needs a validation score"),
        (["sweep.scheduler=asha", "train.select_metric=last"], r"sweep\.scheduler=asha needs a validation score"),
        (["sweep.scheduler=asha", "train.epochs=3", "sweep.asha_grace_period=3"], r"sweep\.asha_grace_period=3 must be < train\.epochs=3"),
        (["sweep.asha_reduction_factor=1"], r"sweep\.asha_reduction_factor"),
        (["sweep.scheduler=hyperband"], r"sweep\.scheduler"),
        (["sweep.search=bayes"], r"sweep\.search"),
    ],
)
def test_inconsistent_search_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_packaged_search_and_asha_examples_load():
    cfg = load_config("demo-search")
    assert cfg.sweep.search == "optuna" and cfg.sweep.num_samples >= 1 and "loss.lam" in cfg.sweep.space
    cfg = load_config("demo-asha")
    assert cfg.sweep.scheduler == "asha" and cfg.sweep.asha_grace_period < cfg.train.epochs
