"""Ray Tune copies some driver environment variables into every trial actor's runtime_env, which each
node's runtime_env agent logs in full; the S3 keys must not be among them (found by tests/image)."""

import json
import os
import subprocess
import sys

from aem_dist.orchestrate import ray_env


def _ray_default() -> set[str]:
    """Ray's own list, from a fresh process: a Ray session started earlier in this one has already applied the fix."""
    code = "import json, ray.tune.execution.class_cache as c; print(json.dumps(sorted(c.ENV_VARS_TO_PROPAGATE)))"
    return set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout))


def test_tune_copies_no_s3_keys_into_trial_runtime_envs(monkeypatch):
    import ray.tune.execution.class_cache as class_cache

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", _ray_default())  # as Ray ships it; restored afterwards
    for name in ray_env.TUNE_COPIED_SECRETS:
        monkeypatch.setenv(name, f"secret-{name}")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

    class Trainable:
        pass

    def copied() -> dict:
        return class_cache._ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]

    assert ray_env.TUNE_COPIED_SECRETS & set(copied())  # what Ray does by default: the reason for the fix
    ray_env._no_credentials_in_trial_runtime_envs()
    env_vars = copied()
    assert not ray_env.TUNE_COPIED_SECRETS & set(env_vars), env_vars
    assert env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"  # Ray Train's own variables still travel
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "secret-AWS_SECRET_ACCESS_KEY"  # the driver keeps its keys
