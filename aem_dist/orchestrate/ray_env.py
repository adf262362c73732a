"""The one place that starts or joins Ray.

* No address (and no ``RAY_ADDRESS``): start a private local Ray (``address="local"``) in its own temp
  dir — never attach to some other cluster recorded in /tmp/ray on a shared machine — and shut it down
  (removing the temp dir) on exit. Token auth stays on with a fresh per-session token passed to child
  processes through ``RAY_AUTH_TOKEN`` (nothing written to ~/.ray), unless ``RAY_AUTH_MODE`` or a token
  path is set.
* An address (``--address``, or ``RAY_ADDRESS`` as set by ``ray job submit``): join that cluster and
  leave it running on exit. Its auth settings come from the environment (``RAY_AUTH_MODE``,
  ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from typing import Iterator

from ..observe.console import console_lines, quiet_console

log = logging.getLogger(__name__)

# Ray Train V2 is the default in Ray 2.60; pin it so an inherited environment cannot flip APIs.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# A Train V2 worker's report queue holds one result, taken when the controller polls the worker group
# (every 2 s by default): each per-epoch ray.train.report then waits for the next poll — measured
# 1.6 s per epoch, half of a small trial's wall time (BENCHMARKS.md). Poll every 0.1 s instead. The
# local Ray processes inherit this; a cluster sets it in its pods' environment (cluster/kuberay).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Tune's "new output engine" prints an experiment box, a results path and a TensorBoard hint pointing
# into Ray's temp dir (deleted when the session ends) even at verbose=0; the live table of
# observe.callbacks is the progress report. The classic engine prints nothing at verbose=0.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ctrl-C is aem-dist's to handle (orchestrate.interrupt): Tune's handler would end the trials as if they
# had completed and advise Tuner.restore, which aem-dist never uses (orchestrate.resume).
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


def _storage_env_from_config(cfg) -> None:
    """The endpoint and region of the config reach Ray processes as AWS_* variables (no secret in them)."""
    s = cfg.storage
    if s.endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = s.endpoint_url
    if s.region:
        os.environ["AWS_REGION"] = s.region


CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def credentials_to_file(cfg=None) -> str | None:
    """Move the S3 credentials (from the config, else the AWS_* variables) out of ``os.environ`` into a
    0600 file in a private 0700 folder, named by ``AWS_SHARED_CREDENTIALS_FILE`` (under ``AWS_PROFILE``
    or ``default``), which botocore/s3fs and pyarrow's AWS SDK read in every process that inherits the
    variable. Ray copies AWS_* variables into the runtime environment of its workers and writes them into
    ``runtime_env_agent.log`` in clear — a path is all it sees now. Returns the folder to remove at the
    end of the session (None: no credentials). The values stay known to :func:`storage.redact`.

    On a cluster joined by address, processes on other nodes do not see this file: give the nodes their
    own credentials (KubeRay: a Secret in the pods' environment, IRSA/workload identity)."""
    from .. import storage

    opts = storage.StorageOptions.from_config(cfg.storage if cfg is not None else None)
    if not (opts.key and opts.secret):
        return None
    storage._SEEN_SECRETS.update(opts.secrets())  # redacted in logs although no longer in the environment
    folder = tempfile.mkdtemp(prefix="aem-cred-")  # 0700
    path = os.path.join(folder, "credentials")
    lines = [f"[{os.environ.get('AWS_PROFILE') or 'default'}]", f"aws_access_key_id = {opts.key}", f"aws_secret_access_key = {opts.secret}"]
    if opts.token:
        lines.append(f"aws_session_token = {opts.token}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = path
    for name in CREDENTIAL_ENV:
        os.environ.pop(name, None)
    return folder


def _short_tmp() -> str:
    """The temp root for Ray: unix socket paths under it must stay < 108 bytes, so a long TMPDIR
    (deep CI or pytest folders) falls back to /tmp."""
    root = tempfile.gettempdir()
    return root if len(root) <= 40 else "/tmp"


@contextlib.contextmanager
def ray_session(address: str | None = None, cfg=None, num_cpus: int | None = None) -> Iterator[None]:
    """Start or join Ray for the duration of the block (see module docstring)."""
    saved = {k: os.environ.get(k) for k in STORAGE_ENV}
    folder = None
    try:
        if cfg is not None:
            _storage_env_from_config(cfg)
        _no_credentials_in_trial_runtime_envs()
        folder = credentials_to_file(cfg)
        with _ray(address, num_cpus):
            yield
    finally:  # a later session in this process (tests, notebooks) must not inherit this one's storage
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


STORAGE_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_REGION", *CREDENTIAL_ENV, "AWS_SHARED_CREDENTIALS_FILE")
TUNE_COPIED_SECRETS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})


def _no_credentials_in_trial_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / session token into every
    trial actor's runtime_env, and the runtime_env agent of each node logs that runtime_env in full
    (/tmp/ray/session_*/logs/runtime_env_agent.log; found by tests/image). The nodes need no copy: a local
    Ray's processes inherit the driver's environment, a cluster's pods get the keys from their Secret (and
    the preflight probe names a node that cannot reach S3 with what it has). So Tune copies the rest only."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - TUNE_COPIED_SECRETS


@contextlib.contextmanager
def _ray(address: str | None, num_cpus: int | None) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        quiet_console()  # Ray's notices that say nothing to a user leave the console (observe.console)
        route_worker_output()
        try:
            yield
        finally:
            ray.shutdown()
        return

    if "RAY_AUTH_MODE" not in os.environ and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        # Ray turns token auth on for new local clusters; hand it a per-session token through the
        # environment (inherited by every Ray process we start) instead of a file in ~/.ray.
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(24))
    temp_dir = tempfile.mkdtemp(prefix="aem-ray-", dir=_short_tmp())
    log.info("starting a private local Ray (temp dir %s)", temp_dir)
    quiet_console(adopt_ray_logger=True)  # configure_logging=False: Ray's records go to our handlers
    ray.init(
        address="local",
        _temp_dir=temp_dir,
        num_cpus=num_cpus,
        include_dashboard=True,  # Train V2's placement-group cleaner queries the state API it serves
        dashboard_host="127.0.0.1",
        dashboard_port=None,  # Ray's default, moving to the next free port if taken
        log_to_driver=True,
        configure_logging=False,
    )
    route_worker_output()
    try:
        yield
    finally:
        ray.shutdown()
        _remove_temp_dir(temp_dir)


def route_worker_output() -> None:
    """Lines Ray forwards to the driver — worker output and the raylet's messages — pass
    :func:`aem_dist.observe.console.console_lines` (all into the run log, noise off the console) before
    Ray prints them as usual. Ray has no public hook for this: its one printing function for both,
    ``print_worker_logs``, is wrapped (once); a Ray without it keeps its output unfiltered."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_worker_logs", None)
    if original is None or getattr(original, "_aem_routed", False):
        return

    def print_worker_logs(data: dict, print_file, ignore_prefix: bool = False) -> None:
        lines = console_lines(data)
        if lines:
            original({**data, "lines": lines}, print_file, ignore_prefix)

    print_worker_logs._aem_routed = True  # type: ignore[attr-defined]
    ray_worker.print_worker_logs = print_worker_logs


def _remove_temp_dir(temp_dir: str, settle_s: float = 5.0) -> None:
    """Remove Ray's temp dir. A Ray helper process may still write a file into it for a moment after
    ``ray.shutdown()`` returns (seen on a loaded 2-core machine), so remove again until it stays gone."""
    deadline = time.monotonic() + settle_s
    while True:
        shutil.rmtree(temp_dir, ignore_errors=True)
        time.sleep(0.2)
        if not os.path.exists(temp_dir) or time.monotonic() > deadline:
            return
