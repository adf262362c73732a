"""Podman on a private storage, for the image test (tests/image/image_cases.py).

Everything lives under one temporary folder: image storage (``--root``), runtime state (``--runroot``),
network definitions (``--network-config-dir``), the containers.conf. :meth:`Podman.close` removes what
this object started, by id (containers, then networks), resets that storage and deletes the folder, so a
run leaves no container, network, image or layer behind and never touches another user's podman state.

Flags this machine needs (../shared/PITFALLS.md, "Containers"): Debian's runc (crun refuses the host's
cgroup v1 hybrid mode), cgroupfs (no systemd), and ``default_ulimits = []`` (setting RLIMIT_NOFILE is
refused here).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CONTAINERS_CONF = """\
[containers]
default_ulimits = []
"""


class PodmanError(RuntimeError):
    pass


class Podman:
    def __init__(self, prefix: str = "aem-image-", reuse: str | None = None):
        """``reuse``: an existing folder whose storage is kept (developing the test: built images are
        reused); by default a fresh folder, removed by :meth:`close`."""
        self.reuse = bool(reuse)
        self.dir = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))  # layers are GBs
        for sub in ("root", "runroot", "networks", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "containers.conf").write_text(CONTAINERS_CONF)
        self.containers: list[str] = []
        self.networks: list[str] = []
        self.env = {"CONTAINERS_CONF": str(self.dir / "containers.conf")}

    def argv(self, *args: str) -> list[str]:
        d = self.dir
        return [
            "podman", "--root", str(d / "root"), "--runroot", str(d / "runroot"), "--storage-driver", "overlay",
            "--runtime", shutil.which("runc", path="/usr/sbin:/usr/bin") or "runc", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--network-config-dir", str(d / "networks"), "--tmpdir", str(d / "tmp"), *args,
        ]  # fmt: skip

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, stdin=None, log=None) -> subprocess.CompletedProcess:
        """Run one podman command; its output is returned (or appended to ``log``, a path, for builds)."""
        import os

        env = os.environ | self.env
        if log is not None:
            with open(log, "ab") as f:
                proc = subprocess.run(self.argv(*args), stdin=stdin, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            if check and proc.returncode != 0:
                raise PodmanError(f"podman {' '.join(args[:2])} failed (rc {proc.returncode}); log {log}:\n{_tail(log)}")
            return proc
        proc = subprocess.run(self.argv(*args), stdin=stdin, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise PodmanError(f"podman {' '.join(args[:3])} failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
        return proc

    def start(self, *run_args: str) -> str:
        """``podman run -d ...``; returns the container id, recorded for :meth:`close`."""
        cid = self("run", "-d", *run_args).stdout.strip().splitlines()[-1]
        self.containers.append(cid)
        return cid

    def network(self, name: str) -> str:
        self("network", "create", name)
        self.networks.append(name)
        return name

    def close(self) -> list[str]:
        """Remove what we started (by id), then the storage; returns problems met (never raises)."""
        problems = []
        for cid in reversed(self.containers):
            p = self("rm", "--force", "--time", "5", cid, check=False, timeout=120)
            if p.returncode != 0:
                problems.append(f"rm {cid[:12]}: {p.stderr.strip()[-300:]}")
        for net in self.networks:
            p = self("network", "rm", "--force", net, check=False, timeout=60)
            if p.returncode != 0:
                problems.append(f"network rm {net}: {p.stderr.strip()[-300:]}")
        if self.reuse:
            return problems
        p = self("system", "reset", "--force", check=False, timeout=300)
        if p.returncode != 0:
            problems.append(f"system reset: {p.stderr.strip()[-300:]}")
        mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if str(self.dir) in line.split()[1]]
        for mount in sorted(mounted, key=len, reverse=True):  # storage mounts left by a failed reset
            subprocess.run(["umount", "--lazy", mount], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            problems.append(f"{self.dir} not removed")
        return problems


def _tail(path, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""
