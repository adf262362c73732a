"""The console leaves Ray's noise out and the run log keeps everything: the filters on real lines seen
in `make demo`, and the run log of a command."""

from __future__ import annotations

import logging

from aem_dist.observe import console
from aem_dist.observe.console import ConsoleFilter, RunLog, console_lines, noise_of

PREEMPTION = ("[2026-12-04 03:47:02,360 E 17675 17902] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
              "'902abc379b5e06128ad22ad201000000' has constructor arguments in the object store and max_restarts > 0")  # fmt: skip
RESOURCE_TB = [
    "Failed to send resource request for train-7df7076c46e143afa8c0450a7446b20d. If this only happens transiently during network partition or "
    "CPU being overloaded, it's safe to ignore this error. If this error persists, file a GitHub issue.",
    "Traceback (most recent call last):",
    '  File "/x/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58, in send_resource_request',
    "    ray.get(",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]


def record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_known_ray_noise_is_recognised_and_nothing_else():
    assert noise_of(PREEMPTION).name == "preemption-watcher"
    assert noise_of("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.").name == "token-auth"
    assert noise_of("INFO aem_dist.engine.loop: epoch 3: loss 0.1").name == "worker-info"
    assert noise_of("anything at all", "PlacementGroupCleaner pid=1").name == "pg-cleaner"
    for keep in ("WARNING aem_dist.data.stream: shard train-000001.tar: skipped 2 bags", "error: data.root does not exist", "epoch 3: loss 0.1"):
        assert noise_of(keep) is None, keep
    f = ConsoleFilter()
    assert not f.filter(record("ray._private.authentication.authentication_token_setup", logging.WARNING, "Token authentication is enabled for this Ray cluster."))
    assert not f.filter(record("ray.tune.tune", logging.INFO, "Total run time: 12 s"))  # Ray's INFO: run log only
    assert f.filter(record("ray.tune.tune", logging.WARNING, "a trial failed"))
    assert f.filter(record("aem_dist.orchestrate.sweep", logging.INFO, "2 trial(s) for 6 grid point(s)"))


def test_a_noise_traceback_is_dropped_with_its_repeats_but_a_real_one_is_shown():
    src = {"actor_name": "TrainController", "pid": 11}
    assert console_lines({**src, "lines": [PREEMPTION, *RESOURCE_TB]}) == []
    # Ray's deduplication repeats the traceback later, without its head line
    repeated = [f"{line}\x1b[32m [repeated 2x across cluster]\x1b[0m" for line in RESOURCE_TB[1:]]
    assert console_lines({**src, "lines": repeated}) == []
    real = ["Traceback (most recent call last):", '  File "/x/aem_dist/engine/loop.py", line 3, in fit', "    raise ValueError('bad bag')", "ValueError: bad bag"]
    assert console_lines({**src, "lines": real}) == real  # the same first line, but no noise head before it
    assert console_lines({"actor_name": "RayTrainWorker", "pid": 12, "lines": ["INFO aem_dist.engine.loop: epoch 0: loss 0.69", "WARNING aem_dist.x: slow shard"]}) == [
        "WARNING aem_dist.x: slow shard"
    ]


def test_the_run_log_keeps_what_the_console_leaves_out(tmp_path):
    out = tmp_path / "sweep"
    with RunLog(str(out), "sweep") as runlog:
        assert runlog.path.startswith(str(out / "logs" / "sweep-")) and runlog.path.endswith(".log")
        logging.getLogger("ray.tune").info("Ray's own info line")
        logging.getLogger("aem_dist.test").warning("our warning")
        console_lines({"actor_name": "TrainController", "pid": 7, "lines": [PREEMPTION]})
        assert console.RunLog.current is runlog
    assert console.RunLog.current is None
    text = (out / "logs").joinpath(runlog.path.rsplit("/", 1)[-1]).read_text()
    assert "(TrainController pid=7) [2026-12-04" in text and "PreemptionWatcher" in text
    assert "WARNING aem_dist.test: our warning" in text
