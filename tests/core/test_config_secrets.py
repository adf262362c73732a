"""Every config error path masks `storage` wholesale, a secret-bearing key cannot be swept, and YAML
cannot multiply itself through aliases (before: `--set storage=<S>`, a malformed `--set
storage.secret:<S>` and a YAML syntax error on the secret's line printed the secret; a swept
storage.secret landed in trial names and records; a 333-byte alias bomb under sweep.space ran > 60 s)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aem_dist.config import ConfigError, load_config

S = "SUPERSECRETVALUE123"
BOMB = """sweep:
  search: random
  num_samples: 1
  space:
    loss.lam:
      choice: &i [&h [&g [&f [&e [&d [&c [&b [&a [1,1,1,1,1,1,1,1,1],*a,*a,*a,*a,*a,*a,*a,*a],*b,*b,*b,*b,*b,*b,*b,*b],*c,*c,*c,*c,*c,*c,*c,*c],\
*d,*d,*d,*d,*d,*d,*d,*d],*e,*e,*e,*e,*e,*e,*e,*e],*f,*f,*f,*f,*f,*f,*f,*f],*g,*g,*g,*g,*g,*g,*g,*g],*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize("overrides, says", [
    ([f"storage={S}"], "storage: Input should be a valid dictionary"),
    ([f"storage.secret:{S}"], "'storage.secret'… (the rest not shown) is not of the form key=value"),
    ([f"storage.endpoint_url={{a: {S}}}"], "storage.endpoint_url"),
    ([f"sweep.grid={{storage.secret: [{S}, b]}}"], "sweep.grid['storage.secret']: storage settings cannot be swept"),
    ([f"sweep.space={{storage.key: {{choice: [{S}]}}}}"], "sweep.space['storage.key']: storage settings cannot be swept"),
    ([f"sweep.grid={{metrics.pushgateway: ['http://u:{S}@h:9091']}}"], "a value holds a user:password URL"),
])
def test_config_errors_never_show_a_storage_value(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    assert says in str(err.value) and S not in str(err.value)


def test_yaml_syntax_error_on_the_secret_line_is_shown_without_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"storage:\n  secret: {S}: : x\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: line 2, column \d+: mapping values are not allowed here") as err:
        load_config(str(path))
    assert S not in str(err.value)


def test_alias_bomb_under_sweep_space_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert path.stat().st_size < 600
    proc = subprocess.run([sys.executable, "-m", "aem_dist", "config", "show", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "YAML expands to more than 100,000 values" in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(ConfigError, match="YAML expands"):
        load_config("demo", [f"sweep.space={{loss.lam: {{choice: {BOMB.split('choice: ', 1)[1].strip()}}}}}"])
