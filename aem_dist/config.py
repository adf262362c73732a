"""The typed configuration tree.

One pydantic model per section, every field with a default and a description. A run is described by
a YAML file plus dotted overrides (``--set loss.lam=0.1``); Ray Tune's ``param_space`` uses the very
same dotted keys and goes through :func:`apply_overrides`, so λ travels YAML → ``Config.loss.lam`` →
the loss in one hop whichever way it was set.

Unknown keys and bad values raise :class:`ConfigError` naming the dotted key at fault.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, SerializeAsAny, ValidationError, field_validator, model_validator

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


# Allowed values, written once: the config validates them and the modules that take them read them with typing.get_args.
LossKind = Literal["neg_entropy", "kl_uniform"]
SelectMetric = Literal["auc+f1", "auc", "f1", "loss", "last"]
SelectTie = Literal["val_loss", "later", "earlier"]
Precision = Literal["fp32", "tf32", "bf16", "auto"]
CompileMode = Literal["off", "on"]
DeviceCacheMode = Literal["auto", "on", "off"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute_local(value: str | None) -> str | None:
    """Local paths become absolute when a config is loaded: Ray workers run in other working directories."""
    if value is None:
        return None
    from .storage import absolute

    return absolute(value)


def _yaml_on_off(value: Any) -> Any:
    """YAML 1.1 reads a bare on/off as true/false; an on|off|auto field takes them back as words."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


class DataConfig(_Section):
    root: str = Field("data/demo", description="Dataset folder or URL (path, file://, s3://bucket/prefix) holding manifest.json and shards.")
    loader: Literal["memory", "stream"] = Field("memory", description="'memory' loads every bag into RAM; 'stream' reads WebDataset shards from storage with a "
        "node-local cache.")
    on_bad_sample: Literal["error", "skip"] = Field("error", description="What a reader does with a bad bag: stop with an error naming shard, key and problem, "
        "or skip it and count the reason.")
    subsample_ratio: float = Field(1.0, gt=0.0, le=1.0, description="Training-time Subsampling: keep this random fraction of each bag's instances per step "
        "(1.0 = off). Evaluation always sees full bags.")
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description="Training order per epoch: shuffle (every bag once, in a seeded permutation) or "
        "balanced (as many bags drawn with replacement, every class equally likely: p = 1 / (C · n_class); the expected gradient equals "
            "train.class_weights=balanced). Both loaders draw the same bags; evaluation is never sampled.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank for the streaming loader.")
    prefetch: int = Field(4, ge=1, description="Batches prepared ahead of the training step (streaming loader).")
    cache_dir: str | None = Field(None, description="Node-local shard cache folder for the streaming loader (default: a folder under the system temp dir).")
    cache_max_gb: float = Field(20.0, gt=0, description="Upper bound of the node-local shard cache, in GiB; least recently used shards are evicted.")
    retries: int = Field(5, ge=0, description="Bounded retries for object-storage reads before a shard read fails.")
    max_instances_per_bag: int = Field(1_000_000, ge=1, description="Largest bag accepted (instances); a manifest, shard or source declaring more is refused "
        "before anything is allocated.")
    max_dim: int = Field(16_384, ge=1, description="Largest feature dim accepted; a manifest or file declaring more is refused before the model or any array "
        "is built.")
    fold: int | None = Field(None, ge=0, description="Cross-validation fold to train on (0..K-1; record folds with `aem-dist splits DATASET --folds K`). None "
        "= the dataset's fixed train/val/test splits. Sweep it like any key: sweep.grid={data.fold: [0, 1, 2]}.")
    device_cache: DeviceCacheMode = Field("auto", description="Keep the decoded split on the GPU for the whole run and pack batches there (memory loader): "
        "auto = when it fits in half the free device memory; on = always; off = never. A no-op on CPU (logged).")

    _absolute = field_validator("root", "cache_dir")(_absolute_local)
    _on_off = field_validator("device_cache", mode="before")(_yaml_on_off)


class ModelConfig(_Section):
    """Options every model has. A model's own options extend this class next to the model (``models/<name>.py``)
    and are registered with it; ``model.name`` picks the class a config's ``model`` section validates with."""

    name: str = Field("abmil", description="Model from the registry (aem_dist.models); each model's own options are listed below as model.<key> [<model>].")
    hidden: int = Field(128, ge=1, description="Width of the instance embedding (the paper's 128).")
    attn_hidden: int | None = Field(None, ge=1, description="Width of the gated-attention network, and of dsmil's queries (default: same as hidden).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on instance embeddings during training.")
    bias: bool = Field(False, description="Bias in the instance embedding layer (the paper's code has none).")


MODEL_OPTIONS: dict[str, type[ModelConfig]] = {}  # model.name → its options class, filled by models.registry.register


def model_options(name: str) -> type[ModelConfig]:
    """The options class of model ``name`` (the base class for a name no model has: build_model refuses it, naming the known ones).

    The registry is filled when :mod:`aem_dist.models` is imported; it is loaded by name on first use, so that
    this bottom layer never imports the models (torch) and a config can be validated anywhere."""
    if not MODEL_OPTIONS:
        importlib.import_module("aem_dist.models")
    return MODEL_OPTIONS.get(name, ModelConfig)


class LossConfig(_Section):
    lam: float = Field(0.0, ge=0.0, description="AEM weight λ: total = CE + λ·Σ a log a (mean over bags). 0 disables AEM.")
    kind: LossKind = Field("neg_entropy", description="Regulariser: the AEM negative entropy, or KL(uniform ‖ a) for the paper's ablation (C2C's KL loss).")


class TrainConfig(_Section):
    epochs: int = Field(50, ge=1, description="Training epochs.")
    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW; decays per iteration by cosine to 0.")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay.")
    seed: int = Field(0, ge=0, description="Seeds model init and dropout/masking draws; also data order and subsampling unless train.data_seed is set.")
    data_seed: int | None = Field(None, ge=0, description="Seeds data order per epoch and subsampling draws (default: train.seed). Sweep grid points fuse into "
        "one population only when their data seeds are equal, so set it to vary initialisation alone across seeds.")
    max_bags_per_batch: int = Field(1, ge=1, description="Bags packed into one step (1 = the paper's batch of one bag).")
    max_instances_per_batch: int | None = Field(None, ge=1, description="Instance budget of a packed step; a bag larger than it is trained alone, never "
        "truncated. None = no budget.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for a local run; under Ray Train the worker's assigned device is used.")
    eval_every: int = Field(1, ge=1, description="Evaluate val/test every this many epochs (and always at the last).")
    select_metric: SelectMetric = Field("auc+f1", description="Validation score for picking the reported epoch: auc+f1 (official), auc, f1 (higher wins), loss "
        "(val NLL, lower wins) or last (the last evaluated epoch). A NaN score never wins.")
    select_tie: SelectTie = Field("val_loss", description="Equal selection scores: val_loss (lower val loss wins, then the later epoch), later, or earlier "
        "(the official strict '>').")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the global gradient norm to this value (None = off).")
    progress: bool = Field(True, description="Show progress bars.")
    patience: int | None = Field(None, ge=1, description="Early stopping: stop once the validation score (train.select_metric) has not improved for this many "
        "epochs since the best epoch (checked at evaluated epochs; None = train every epoch). Needs a val split; the stop epoch is recorded in results.json. "
            "Population members stop individually: each one's history, selection and checkpoints end where its standalone run would stop.")
    class_weights: Literal["none", "balanced"] | list[float] = Field("none", description="Per-class weights of the slide-label cross-entropy: none, "
        "balanced (n_train / (n_classes · n_train of the class), from the training split) or a list of positive weights in class order. Each bag's "
            "cross-entropy is multiplied by its class's weight and the batch takes the plain mean over its bags (not torch's Σw-normalised mean, which would "
                "cancel the weight of a one-bag batch).")

    log_every: int = Field(0, ge=0, description="Read the device-side step statistics (loss terms, NaN/Inf check) every this many steps; 0 = once per epoch "
        "(and every 256 steps). A non-finite loss stops the run at most this many steps late, before any checkpoint of the poisoned weights.")
    precision: Precision = Field("fp32", description="Matmul precision: fp32; tf32 (CUDA tensor cores, float32 tensors); bf16 (autocast: every matmul of "
        "training and evaluation in bfloat16; softmax, entropy, AEM, loss and optimizer state stay float32); auto (bf16 where the device has native bf16 "
        "matrix units: AMX/AVX512-BF16 CPUs, CUDA compute capability >= 8.0; fp32 elsewhere).")
    compile: CompileMode = Field("off", description="torch.compile the model forward + loss with dynamic shapes (recompiles capped and logged); same numbers "
        "as eager within 1e-4 relative.")
    deterministic: bool = Field(False, description="Deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, no atomics in segment "
        "sums on CUDA) so a GPU run repeats bit for bit; off by default for speed. CPU runs repeat either way.")

    _on_off = field_validator("compile", mode="before")(_yaml_on_off)

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        if isinstance(value, list) and (len(value) < 2 or not all(math.isfinite(w) and w > 0 for w in value)):
            raise ValueError(f"{value}: class weights are at least 2 finite numbers > 0, one per class in class order")
        return value

    @model_validator(mode="after")
    def _patience_needs_a_score(self) -> "TrainConfig":
        if self.patience is not None and self.select_metric == "last":
            raise ValueError("train.patience needs a score that can stop improving; train.select_metric=last replaces the selection every epoch")
        return self


class ScalingSection(_Section):
    num_workers: int = Field(0, ge=0, description="Ray Train workers (DDP ranks). 0 = run the loop in-process without DDP.")
    use_gpu: bool = Field(False, description="One GPU per worker (nccl); CPU workers use gloo.")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Ray resources per worker, e.g. {CPU: 2, GPU: 0.5}.")


class RunSection(_Section):
    name: str = Field("aem", description="Run name; no timestamps, so re-running with the same storage_path and name resumes.")
    storage_path: str | None = Field(None, description="Where Ray keeps checkpoints and results (path or s3:// URL); default: the --out folder.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train may do from the last checkpoint (-1 = unlimited).")
    checkpoint_keep: int = Field(2, ge=1, description="Checkpoints kept per run (the best-scoring and latest survive).")
    checkpoint_every: int = Field(1, ge=1, description="Ray runs: attach a checkpoint to every N-th epoch's report (and the last); metrics are reported every "
        "epoch. A failure resumes from the last checkpointed epoch.")
    stall_timeout_s: float = Field(1800.0, gt=0.0, description="Sweeps: a trial with no epoch report for this long whose processes are idle or gone is "
        "stalled (one line names it, its last epoch and its logs; see run.on_stall). Before a Ray Train trial's first report (its worker unknown): twice this.")
    wait_timeout_s: float = Field(3600.0, gt=0.0, description="Sweeps: trials waiting with none running and nothing happening for this long is a stalled "
        "sweep (the cluster cannot place a trial): one line says what waits; see run.on_stall.")
    on_stall: Literal["fail", "warn"] = Field("fail", description="What a stall does: 'fail' ends the stalled trial as an error (or the stalled sweep), "
        "so `--resume` redoes it from its last checkpoint; 'warn' prints the line and waits on.")

    _absolute = field_validator("storage_path")(_absolute_local)


class SweepSection(_Section):
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key → list of values; the sweep runs the full product.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials at once (default: derived from cluster resources and resources_per_trial).")
    trial_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per trial (with num_workers 0) or per Ray Train worker.")
    trial_gpus: float = Field(0.0, ge=0.0, description="GPUs per trial; fractions pack several trials on one GPU.")
    population: int | Literal["auto", "off"] = Field("auto", description="Fuse grid points that differ only in loss.lam, loss.kind, train.seed, train.lr, "
        "train.weight_decay (and share train.data_seed) into populations trained as one stacked model in one trial: 'auto' (as many members as fit, see "
            "docs/ARCHITECTURE.md), 'off' (one trial per grid point), or N (at most N members per population).")
    report: bool = Field(True, description="Write report.md and its plots (aem-dist report) when the sweep ends. Off: the tables only (the report's UMAP alone "
        "compiles for ~10-13 s, docs/observability.md); `aem-dist report OUT` writes it later.")

    search: Literal["grid", "random", "optuna"] = Field("grid", description="How trial points are chosen: 'grid' (every point of sweep.grid), 'random' "
        "(sweep.num_samples points drawn from sweep.space by Ray Tune's random search) or 'optuna' (sweep.num_samples points proposed one after another by "
            "Optuna's TPE through Ray Tune's OptunaSearch, maximising the best validation score by train.select_metric). random and optuna never fuse trials "
                "into populations.")
    space: dict[str, dict[str, Any]] = Field(default_factory=dict, description="For search random/optuna: dotted key → distribution, one of "
        "{loguniform: [low, high]}, {uniform: [low, high]}, {randint: [low, high]} (integers, high excluded) or {choice: [v1, v2, ...]}; "
        "e.g. {loss.lam: {loguniform: [1.0e-4, 1]}, train.lr: {loguniform: [1.0e-5, 1.0e-3]}}.")
    num_samples: int = Field(0, ge=0, description="For search random/optuna: how many points are drawn and trained (required, ≥ 1). A grid runs each of its "
        "points once and leaves this 0.")
    search_seed: int = Field(0, ge=0, description="Seeds the random/optuna search: the same seed draws the same points (optuna: the same first points; later "
        "ones depend on the results, which repeat when trials finish in the same order).")
    scheduler: Literal["none", "asha"] = Field("none", description="Early stopping of trials: 'none', or 'asha' (Ray Tune's ASHAScheduler on the best "
        "validation score so far by train.select_metric, judged after each epoch but the last). Stopped trials are marked STOPPED_EARLY in trials.csv and "
            "never give the chosen λ. Trials run unfused under a scheduler.")
    asha_grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial trains before it can be stopped (the first rung); must be < train.epochs.")
    asha_reduction_factor: float = Field(3.0, gt=1.0, description="ASHA: rungs lie at grace_period × factor^k epochs; at each rung a trial continues only if "
        "its score is in the top 1/factor of the trials that reached that rung before it.")

    @field_validator("space", mode="before")
    @classmethod
    def _space_specs(cls, space: Any) -> Any:
        if isinstance(space, dict):
            return {key: parse_distribution(key, spec) for key, spec in space.items()}
        return space

    @field_validator("population", mode="before")
    @classmethod
    def _population_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @field_validator("population")
    @classmethod
    def _population(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'auto', 'off' or a positive number of members")
        return value

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"sweep.grid[{key!r}] is empty")
        return grid


class MetricsSection(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics from the driver.")
    host: str = Field("127.0.0.1", description="Address the metrics endpoint binds (0.0.0.0 on a cluster).")
    port: int = Field(9464, ge=0, le=65535, description="Port of the metrics endpoint (0 = any free port). When another process holds it, "
        "the next free port of the 100 after it serves, and the printed URL says so.")
    grace_s: float = Field(15.0, ge=0.0, description="Keep serving this long after the run ends so the last values get scraped — only if the endpoint was "
        "scraped during the run, or with metrics.grace_always.")
    grace_always: bool = Field(False, description="Apply metrics.grace_s even when nothing scraped the endpoint during the run (e.g. runs shorter than the "
        "scrape interval).")
    pushgateway: str | None = Field(None, description="Pushgateway address (host:port) for final results; None = no push.")


class MlflowSection(_Section):
    enabled: bool = Field(
        False,
        description="Log every run and sweep trial to MLflow (needs `pip install 'aem-dist[mlflow]'`): one parent run per sweep, a child run per "
        "grid point with params (swept keys + config), metrics per epoch, results.json and best/state.pt as artifacts; the sweep's report as the "
        "parent's. See docs/observability.md.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (an MLflow server http(s)://…, sqlite:///path, databricks, …); None = an embedded store in the output "
        "folder (sqlite:///OUT/mlflow/mlflow.db, artifacts in OUT/mlflow/artifacts; needs a local --out). Credentials go in MLFLOW_TRACKING_USERNAME "
        "/ MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, never in the URI.",
    )
    experiment: str | None = Field(None, description="MLflow experiment name (default: run.name).")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri and re.search(r"://[^/@\s]+:[^/@\s]*@", uri):
            raise ValueError(
                "holds credentials (user:password@): set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead, so they never reach run records"
            )
        return uri


class StorageSection(_Section):
    endpoint_url: str | None = Field(None, description="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).")
    key: SecretStr | None = Field(None, description="Access key id (default: AWS_ACCESS_KEY_ID). Never logged or saved.")
    secret: SecretStr | None = Field(None, description="Secret access key (default: AWS_SECRET_ACCESS_KEY). Never logged or saved.")
    region: str | None = Field(None, description="Region (default: AWS_REGION / AWS_DEFAULT_REGION).")
    connect_timeout_s: float = Field(5.0, gt=0.0, description="Connect timeout per S3 request.")
    read_timeout_s: float = Field(60.0, gt=0.0, description="Read timeout per S3 request.")


class DebugSection(_Section):
    fail_at_epoch: int | None = Field(None, ge=0, description="Raise once in rank 0 at the end of this epoch (fault-injection for tests and demos).")
    stall_at_epoch: int | None = Field(None, ge=0, description="Sweeps: rank 0 stops for good, idle, after this epoch's report (a hung worker, to see the "
        "stall watchdog act; a resumed trial starts after that epoch).")


class Config(_Section):
    """Everything a run needs; see each section's field descriptions (``aem-dist config --help``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: SerializeAsAny[ModelConfig] = Field(default_factory=lambda: model_options("abmil")())
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    @field_validator("model", mode="wrap")
    @classmethod
    def _model_options(cls, value: Any, handler: Any) -> ModelConfig:
        """The ``model`` section validates with the options class of its ``model.name``."""
        return model_options(value.get("name", "abmil")).model_validate(value) if isinstance(value, dict) else handler(value)

    @model_validator(mode="after")
    def _grid_keys_exist(self) -> "Config":
        for where, keys in (("sweep.grid", self.sweep.grid), ("sweep.space", self.sweep.space)):
            for key in keys:
                if _secret_bearing(key):  # swept values go into trial names, run.json, trials.csv, Tune's files
                    raise ConfigError(f"{where}[{key!r}]: storage settings cannot be swept (the section holds credentials; swept values are written into "
                        f"trial names and records)")
        for key, values in self.sweep.grid.items():
            if any(isinstance(v, str) and _USERINFO.search(v) for v in values):
                raise ConfigError(f"sweep.grid[{key!r}]: a value holds a user:password URL; swept values are written into trial names and records")
        for key in self.sweep.grid:
            _check_dotted_key(self, key)
        for key in self.sweep.space:
            try:
                _check_dotted_key(self, key)
            except ConfigError as err:
                raise ConfigError(f"sweep.space: {err}") from None
        _check_search(self)
        return self

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain-data view. Secrets (storage.key/secret) come out as None — safe to log, save, or hand to
        Ray, which writes configs to disk; ``redact=False`` keeps them, for in-memory use only."""
        data = self.model_dump(mode="json")
        for name in ("key", "secret"):
            value = getattr(self.storage, name)
            data["storage"][name] = value.get_secret_value() if (value is not None and not redact) else None
        return data


def _fields(node: BaseModel) -> set[str]:
    """Keys a section may hold; for ``model``, those of any model (the model a key belongs to is checked on validation)."""
    if isinstance(node, ModelConfig):
        return {k for options in (ModelConfig, *MODEL_OPTIONS.values()) for k in options.model_fields}
    return set(type(node).model_fields)


def _check_dotted_key(cfg: BaseModel, dotted: str) -> None:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in _fields(node):
            raise ConfigError(f"unknown config key {dotted!r} (no field {part!r})")
        node = getattr(node, part, None)


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


def parse_distribution(key: str, spec: Any) -> dict[str, list[Any]]:
    """One ``sweep.space`` entry, checked and normalised: ``{kind: [args]}`` with numeric bounds as numbers
    (YAML reads ``1e-4`` as text). Raises ValueError naming ``sweep.space['key']``."""
    where = f"sweep.space[{key!r}]"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where} must be one distribution, e.g. {{loguniform: [1.0e-4, 1]}}; kinds: {', '.join(DISTRIBUTIONS)}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; kinds: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ValueError(f"{where}: {kind} needs a list ({'[v1, v2, ...]' if kind == 'choice' else '[low, high]'})")
    if kind == "choice":
        return {kind: list(args)}
    if len(args) != 2:
        raise ValueError(f"{where}: {kind} needs [low, high], got {len(args)} value(s)")
    try:
        low, high = (float(a) if not isinstance(a, bool) else math.nan for a in args)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {kind} bounds must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"{where}: {kind} needs finite low < high, got [{low:g}, {high:g}]")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs 0 < low, got [{low:g}, {high:g}]")
    if kind == "randint":
        if low != int(low) or high != int(high):
            raise ValueError(f"{where}: randint bounds must be integers, got [{low:g}, {high:g}]")
        return {kind: [int(low), int(high)]}
    return {kind: [low, high]}


def _check_search(cfg: "Config") -> None:
    """sweep.search, sweep.space, sweep.num_samples and sweep.scheduler agree (ConfigError naming the keys)."""
    sw = cfg.sweep
    if sw.search == "grid":
        if sw.space:
            raise ConfigError(f"sweep.space holds distributions ({', '.join(sw.space)}) but sweep.search is 'grid': set sweep.search=random or optuna, or list "
                f"values in sweep.grid")
        if sw.num_samples:
            raise ConfigError("sweep.num_samples is for sweep.search=random or optuna; a grid runs each of its points once")
    else:
        if not sw.space:
            raise ConfigError(f"sweep.search={sw.search} needs sweep.space, e.g. sweep.space={{loss.lam: {{loguniform: [1.0e-4, 1]}}}}")
        if sw.num_samples < 1:
            raise ConfigError(f"sweep.search={sw.search} needs sweep.num_samples >= 1 (points to draw), got {sw.num_samples}")
        if sw.grid:
            raise ConfigError(f"sweep.search={sw.search} samples sweep.space only; sweep.grid must be empty (a discrete key goes in sweep.space as {{choice: "
                f"[...]}})")
    if (sw.scheduler != "none" or sw.search == "optuna") and cfg.train.select_metric == "last":
        what = "sweep.scheduler=asha" if sw.scheduler != "none" else "sweep.search=optuna"
        raise ConfigError(f"{what} needs a validation score, but train.select_metric=last has none: choose auc+f1, auc, f1 or loss")
    if sw.scheduler == "asha" and sw.asha_grace_period >= cfg.train.epochs:
        raise ConfigError(f"sweep.asha_grace_period={sw.asha_grace_period} must be < train.epochs={cfg.train.epochs}: ASHA judges trials before their last "
            f"epoch")


def space_points(cfg: "Config") -> list[dict[str, Any]]:
    """Values that stand for every ``sweep.space`` distribution in validation: each key's bounds (randint:
    its highest value) or each choice, one key at a time."""
    points = []
    for key, spec in cfg.sweep.space.items():
        kind, args = next(iter(spec.items()))
        values = args if kind == "choice" else [args[0], args[1] - 1] if kind == "randint" else args
        points += [{key: v} for v in values]
    return points


def check_sweep_space(cfg: "Config") -> int:
    """Validate the ``sweep.space`` bounds and choices against the config (before Ray starts): a bound the
    key cannot take raises ConfigError naming ``sweep.space['key']``. Returns the number of values checked."""
    points = space_points(cfg)
    for point in points:
        ((key, value),) = point.items()
        try:
            config_with(cfg, point)
        except ConfigError as err:
            shown = "***" if key in SECRET_KEYS else repr(mask_userinfo(value))
            raise ConfigError(f"sweep.space[{key!r}] value {shown}: {str(err).removeprefix('override: ')}") from None
    return len(points)


SECRET_KEYS = ("storage.key", "storage.secret")
_USERINFO = re.compile(r"(://)[^/@\s:]+:[^/@\s]+@")


def mask_userinfo(obj: Any) -> Any:
    """``obj`` (a plain config dict, list or string) with ``user:password@`` in URLs replaced by
    ``***:***@``. For what is displayed or stored only — never for the config a run uses."""
    if isinstance(obj, dict):
        return {k: mask_userinfo(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask_userinfo(v) for v in obj]
    return _USERINFO.sub(r"\1***:***@", obj) if isinstance(obj, str) else obj


def _secret_bearing(key: str) -> bool:
    """``storage`` and everything under it: the section holds the credentials, so an error, a sweep or a
    display never shows any value given there (``--set storage=<secret>`` is as secret as ``storage.secret``)."""
    return key == "storage" or key.startswith("storage.") or key in SECRET_KEYS


def _shown_input(key: str, value: Any) -> str:
    """What an error may echo of a bad value: never a secret, never a whole section (which could hold one)."""
    if _secret_bearing(key) or any(key == k or key.startswith(k + ".") for k in SECRET_KEYS):
        return " (got ***)"
    if isinstance(value, (dict, list, tuple, set)) or value is None:
        return f" (got a {type(value).__name__})" if value is not None else ""
    text = repr(mask_userinfo(value) if isinstance(value, str) else value)
    return f" (got {text[:80]}{'…' if len(text) > 80 else ''})"


def _format_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "<root>"
        owners = [n for n, options in MODEL_OPTIONS.items() if loc.startswith("model.") and loc[6:] in options.model_fields]
        if e["type"] == "extra_forbidden" and owners:
            lines.append(f"{key} is an option of model.name={'|'.join(owners)} only, not of the model chosen")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        elif not loc or (e["type"] == "value_error" and str(e["msg"]).removeprefix("Value error, ").startswith(key)):
            lines.append(str(e["msg"]).removeprefix("Value error, "))  # a check whose message names the key itself
        else:
            lines.append(f"{key}: {e['msg']}{_shown_input(key, e.get('input'))}")
    return "; ".join(lines)


def parse_value(text: str) -> Any:
    """Parse an override value like YAML does: '0.1' → 0.1, 'true' → True, '[1, 2]' → [1, 2], 'abc' → 'abc'."""
    try:
        return safe_yaml(text, "override")
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["loss.lam=0.1", "model.name=mha"]`` → ``{"loss.lam": 0.1, "model.name": "mha"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            # Only the leading dotted name is echoed: a mistyped 'storage.secret:<S>' holds the secret.
            name = re.match(r"[A-Za-z0-9_.]*", item).group()  # type: ignore[union-attr]
            shown = repr(item) if name == item else f"{name!r}… (the rest not shown)"
            raise ConfigError(f"override {shown} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a plain config dict with dotted keys set. The one place dotted keys are applied."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict into a :class:`Config`, with errors naming the dotted key."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_error(err)}") from None


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the bare name of a packaged config ('demo', 'camelyon16', ...).

    Something that looks like a path (a folder part or a file suffix) is only ever that file: a
    missing ``/wrong/path/camelyon16.yaml`` is an error, never the packaged file of the same name.
    The one exception is the repository's own relative layout, ``configs/<name>.yaml``, which mirrors
    the packaged folder: where no ``configs/`` folder exists (a RayJob's working directory) the
    packaged copy is used, with a warning naming it.
    """
    p = Path(path)
    if p.exists():
        return p
    text = str(path)
    packaged = PACKAGED_CONFIGS / f"{p.name}.yaml"
    if "/" not in text and "\\" not in text and not p.suffix and packaged.exists():
        return packaged
    in_repo_layout = PACKAGED_CONFIGS / p.name
    if p.parent == Path("configs") and not p.parent.exists() and in_repo_layout.exists():
        import logging

        logging.getLogger(__name__).warning("config %s: no configs/ folder here; using the packaged %s", text, in_repo_layout)
        return in_repo_layout
    hint = f"; the packaged config of that name is --config {p.stem}" if (PACKAGED_CONFIGS / f"{p.stem}.yaml").exists() else ""
    raise ConfigError(f"config file {text!r} not found{hint} (packaged configs: {', '.join(list_packaged())})")


def list_packaged() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; anything larger is not one


def read_config_text(p: Path) -> str:
    """The text of a config file: a regular file of bounded size holding UTF-8 text, else ConfigError."""
    try:
        st = p.stat()
    except OSError as err:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {err.strerror}") from None
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a regular file (a folder or device?)")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r} is {st.st_size:,} bytes, more than a config can be ({MAX_CONFIG_BYTES:,})")
    with open(p, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (a binary file?)") from None
    if "\0" in text:
        raise ConfigError(f"config file {str(p)!r} is not text (it holds NUL bytes)")
    return text


MAX_YAML_NODES = 100_000  # a config is a few hundred values; aliases may not multiply it past this


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` after counting the values the document expands to, aliases expanded (memoised
    per node, so the count itself is linear): a 527-byte alias bomb ("billion laughs") under
    ``sweep.space`` expands to ~10^9 values for whoever walks it. Raises ConfigError above
    MAX_YAML_NODES, yaml.YAMLError for invalid YAML."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once (safe_load refuses nothing here; the walk must end)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(v) for v in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        sizes[id(node)] = min(n, MAX_YAML_NODES + 1)
        return sizes[id(node)]

    if root is not None and size(root) > MAX_YAML_NODES:
        raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES:,} values (aliases repeated into a bomb?); write the values out")
    return yaml.safe_load(text)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error without the snippet of the offending line that PyYAML quotes (the line may hold
    ``secret: …``): what is wrong and where (line, column) only."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return where + ("; ".join(str(p) for p in parts if p) or type(err).__name__)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    try:
        data = safe_yaml(read_config_text(p), str(p)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load YAML (or defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        tmp = build_config(data, str(path or "defaults"))
        for key in overrides:
            _check_dotted_key(tmp, key)
        data = apply_overrides(data, overrides)
    return build_config(data, str(path or "defaults"))


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every point of a ``sweep.grid`` (dotted key → values), in grid order: the one place the grid is expanded."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def grid_configs(cfg: Config) -> list[Config]:
    """The config of every point of ``sweep.grid``. Raises ConfigError naming the grid point and the key."""
    configs = []
    for point in grid_points(cfg.sweep.grid):
        try:
            configs.append(config_with(cfg, point))
        except ConfigError as err:
            shown = ", ".join(f"{k}: {'***' if k in SECRET_KEYS else repr(mask_userinfo(v))}" for k, v in point.items())
            raise ConfigError(f"sweep.grid point {{{shown}}}: {str(err).removeprefix('override: ')}") from None
    return configs


def check_sweep_grid(cfg: Config) -> int:
    """Validate every point of ``sweep.grid`` against the config (before Ray starts); returns the number of points."""
    return len(grid_configs(cfg))


def config_with(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new config equal to ``cfg`` with dotted overrides applied (used by sweeps for each trial)."""
    for key in overrides:
        _check_dotted_key(cfg, key)
    return build_config(apply_overrides(cfg.to_dict(redact=False), overrides), "override")


def dump_yaml(cfg: Config) -> str:
    """The config as shown to people: secrets removed, URL passwords masked."""
    return yaml.safe_dump(mask_userinfo(cfg.to_dict()), sort_keys=False)


def config_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every leaf field; a model's own options say which models have them."""
    rows: list[tuple[str, Any, str]] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if ann is ModelConfig:  # the options every model has, then each model's own (with the models that have it)
            rows += describe_keys(ModelConfig, f"{prefix}{name}.")
            owners: dict[str, tuple[Any, list[str]]] = {}
            for model_name, options in (model_options("abmil") and MODEL_OPTIONS).items():
                for key, field in options.model_fields.items():
                    if key not in ModelConfig.model_fields:
                        owners.setdefault(key, (field, []))[1].append(model_name)
            rows += [(f"{prefix}{name}.{k}", f.get_default(call_default_factory=True), f"[{', '.join(ns)}] {f.description}") for k, (f, ns) in owners.items()]
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_keys(ann, f"{prefix}{name}.")
        else:
            default = info.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", default, info.description or ""))
    return rows
