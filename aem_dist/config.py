"""The typed configuration tree.

One pydantic model per section, every field with a default and a description. A run is described by
a YAML file plus dotted overrides (``--set loss.lam=0.1``); Ray Tune's ``param_space`` uses the very
same dotted keys and goes through :func:`apply_overrides`, so λ travels YAML → ``Config.loss.lam`` →
the loss in one hop whichever way it was set.

Unknown keys and bad values raise :class:`ConfigError` naming the dotted key at fault.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


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
    loader: Literal["memory", "stream"] = Field("memory", description="'memory' loads every bag into RAM; 'stream' reads WebDataset shards from storage with a node-local cache.")
    on_bad_sample: Literal["error", "skip"] = Field("error", description="What a reader does with a bad bag: stop with an error naming shard, key and problem, or skip it and count the reason.")
    subsample_ratio: float = Field(1.0, gt=0.0, le=1.0, description="Training-time Subsampling: keep this random fraction of each bag's instances per step (1.0 = off). Evaluation always sees full bags.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank for the streaming loader.")
    prefetch: int = Field(4, ge=1, description="Batches prepared ahead of the training step (streaming loader).")
    cache_dir: str | None = Field(None, description="Node-local shard cache folder for the streaming loader (default: a folder under the system temp dir).")
    cache_max_gb: float = Field(20.0, gt=0, description="Upper bound of the node-local shard cache, in GiB; least recently used shards are evicted.")
    retries: int = Field(5, ge=0, description="Bounded retries for object-storage reads before a shard read fails.")
    device_cache: Literal["auto", "on", "off"] = Field("auto", description="Keep the decoded split on the GPU for the whole run and pack batches there (memory loader): auto = when it fits in half the free device memory; on = always; off = never. A no-op on CPU (logged).")

    _absolute = field_validator("root", "cache_dir")(_absolute_local)
    _on_off = field_validator("device_cache", mode="before")(_yaml_on_off)


class ModelConfig(_Section):
    name: str = Field("abmil", description="Model from the registry: abmil, mha, dsmil, acmil, dtfd, maxpool, meanpool, clam_sb, transmil.")
    hidden: int = Field(128, ge=1, description="Width of the instance embedding (the paper's 128).")
    attn_hidden: int | None = Field(None, ge=1, description="Width of the gated-attention network, and of dsmil's queries (default: same as hidden).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on instance embeddings during training.")
    n_heads: int = Field(8, ge=1, description="Attention heads (mha; transmil's Nystrom attention). model.hidden must be divisible by it.")
    n_branches: int = Field(5, ge=1, description="Attention branches (acmil).")
    n_pseudo_bags: int = Field(4, ge=1, description="Pseudo-bags per bag (dtfd).")
    mask_top_k: int = Field(10, ge=0, description="Top-attended instances considered for random masking (acmil, training only).")
    mask_prob: float = Field(0.6, ge=0.0, le=1.0, description="Share of the top-k instances masked at random in each branch: floor(k·p) of them, so each is masked with probability ~p (acmil, training only).")
    bias: bool = Field(False, description="Bias in the instance embedding layer (the paper's code has none).")
    k_sample: int = Field(8, ge=1, description="Instances sampled from each end of the attention ranking for the instance-level clustering loss (clam_sb; CLAM's B).")
    bag_weight: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the bag cross-entropy in clam_sb's loss; the instance loss gets 1 - bag_weight (CLAM's default 0.7).")


class LossConfig(_Section):
    lam: float = Field(0.0, ge=0.0, description="AEM weight λ: total = CE + λ·Σ a log a (mean over bags). 0 disables AEM.")
    kind: Literal["neg_entropy", "kl_uniform"] = Field("neg_entropy", description="Regulariser: the AEM negative entropy, or KL(a ‖ uniform) for the paper's ablation.")


class TrainConfig(_Section):
    epochs: int = Field(50, ge=1, description="Training epochs.")
    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW; decays per iteration by cosine to 0.")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay.")
    seed: int = Field(0, ge=0, description="Seeds model init, data order per epoch, subsampling and dropout.")
    max_bags_per_batch: int = Field(1, ge=1, description="Bags packed into one step (1 = the paper's batch of one bag).")
    max_instances_per_batch: int | None = Field(None, ge=1, description="Instance budget of a packed step; a bag larger than it is trained alone, never truncated. None = no budget.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for a local run; under Ray Train the worker's assigned device is used.")
    eval_every: int = Field(1, ge=1, description="Evaluate val/test every this many epochs (and always at the last).")
    select_metric: Literal["auc+f1", "auc", "f1"] = Field("auc+f1", description="Validation score for picking the test epoch (strictly greater wins).")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the global gradient norm to this value (None = off).")
    progress: bool = Field(True, description="Show progress bars.")

    log_every: int = Field(0, ge=0, description="Read the device-side step statistics (loss terms, NaN/Inf check) every this many steps; 0 = once per epoch (and every 256 steps). A non-finite loss stops the run at most this many steps late, before any checkpoint of the poisoned weights.")
    precision: Literal["fp32", "tf32", "bf16"] = Field("fp32", description="Matmul precision: fp32; tf32 (CUDA tensor cores, float32 tensors); bf16 (autocast for the linear layers; softmax, entropy, AEM and loss stay float32).")
    compile: Literal["off", "on"] = Field("off", description="torch.compile the model forward + loss with dynamic shapes (recompiles capped and logged); same numbers as eager within 1e-4 relative.")
    deterministic: bool = Field(False, description="Deterministic kernels (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, no atomics in segment sums on CUDA) so a GPU run repeats bit for bit; off by default for speed. CPU runs repeat either way.")

    _on_off = field_validator("compile", mode="before")(_yaml_on_off)


class ScalingSection(_Section):
    num_workers: int = Field(0, ge=0, description="Ray Train workers (DDP ranks). 0 = run the loop in-process without DDP.")
    use_gpu: bool = Field(False, description="One GPU per worker (nccl); CPU workers use gloo.")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Ray resources per worker, e.g. {CPU: 2, GPU: 0.5}.")


class RunSection(_Section):
    name: str = Field("aem", description="Run name; no timestamps, so re-running with the same storage_path and name resumes.")
    storage_path: str | None = Field(None, description="Where Ray keeps checkpoints and results (path or s3:// URL); default: the --out folder.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train may do from the last checkpoint (-1 = unlimited).")
    checkpoint_keep: int = Field(2, ge=1, description="Checkpoints kept per run (the best-scoring and latest survive).")

    _absolute = field_validator("storage_path")(_absolute_local)


class SweepSection(_Section):
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key → list of values; the sweep runs the full product.")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials at once (default: derived from cluster resources and resources_per_trial).")
    trial_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per trial (with num_workers 0) or per Ray Train worker.")
    trial_gpus: float = Field(0.0, ge=0.0, description="GPUs per trial; fractions pack several trials on one GPU.")

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
    port: int = Field(9464, ge=0, le=65535, description="Port of the metrics endpoint (0 = any free port).")
    grace_s: float = Field(15.0, ge=0.0, description="Keep serving this long after the run ends so the last values get scraped.")
    pushgateway: str | None = Field(None, description="Pushgateway address (host:port) for final results; None = no push.")


class StorageSection(_Section):
    endpoint_url: str | None = Field(None, description="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).")
    key: SecretStr | None = Field(None, description="Access key id (default: AWS_ACCESS_KEY_ID). Never logged or saved.")
    secret: SecretStr | None = Field(None, description="Secret access key (default: AWS_SECRET_ACCESS_KEY). Never logged or saved.")
    region: str | None = Field(None, description="Region (default: AWS_REGION / AWS_DEFAULT_REGION).")
    connect_timeout_s: float = Field(5.0, gt=0.0, description="Connect timeout per S3 request.")
    read_timeout_s: float = Field(60.0, gt=0.0, description="Read timeout per S3 request.")


class DebugSection(_Section):
    fail_at_epoch: int | None = Field(None, ge=0, description="Raise once in rank 0 at the end of this epoch (fault-injection for tests and demos).")


class Config(_Section):
    """Everything a run needs; see each section's field descriptions (``aem-dist config --help``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    @model_validator(mode="after")
    def _grid_keys_exist(self) -> "Config":
        for key in self.sweep.grid:
            _check_dotted_key(self, key)
        return self

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain-data view. Secrets (storage.key/secret) come out as None — safe to log, save, or hand to
        Ray, which writes configs to disk; ``redact=False`` keeps them, for in-memory use only."""
        data = self.model_dump(mode="json")
        for name in ("key", "secret"):
            value = getattr(self.storage, name)
            data["storage"][name] = value.get_secret_value() if (value is not None and not redact) else None
        return data


def _check_dotted_key(cfg: BaseModel, dotted: str) -> None:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ConfigError(f"unknown config key {dotted!r} (no field {part!r})")
        node = getattr(node, part)


def _format_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_value(text: str) -> Any:
    """Parse an override value like YAML does: '0.1' → 0.1, 'true' → True, '[1, 2]' → [1, 2], 'abc' → 'abc'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["loss.lam=0.1", "model.name=mha"]`` → ``{"loss.lam": 0.1, "model.name": "mha"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
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
    """A config file path, or the name of a packaged config ('demo', 'camelyon16', ...)."""
    p = Path(path)
    if p.exists():
        return p
    packaged = PACKAGED_CONFIGS / (p.name if p.suffix else f"{p.name}.yaml")
    if packaged.exists():
        return packaged
    raise ConfigError(f"config file {str(path)!r} not found (packaged configs: {', '.join(list_packaged())})")


def list_packaged() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
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


def config_with(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new config equal to ``cfg`` with dotted overrides applied (used by sweeps for each trial)."""
    for key in overrides:
        _check_dotted_key(cfg, key)
    return build_config(apply_overrides(cfg.to_dict(redact=False), overrides), "override")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every leaf field."""
    rows: list[tuple[str, Any, str]] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_keys(ann, f"{prefix}{name}.")
        else:
            default = info.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", default, info.description or ""))
    return rows
