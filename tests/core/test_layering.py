"""The layering contract (.importlinter, docs/ARCHITECTURE.md) holds, and would catch a circle or an upward import; no line over 160 characters.

import-linter reads every import statement, also the ones inside functions, so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())", "--no-cache"]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_contract_holds():
    run = lint(REPO)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_a_deliberate_circle_and_an_upward_import_are_caught(tmp_path):
    shutil.copytree(REPO / "aem_dist", tmp_path / "aem_dist", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    dist = tmp_path / "aem_dist" / "engine" / "dist.py"  # engine.loop imports engine.dist: a lazy import back closes a circle
    dist.write_text(dist.read_text() + "\n\ndef _circle():\n    from .loop import fit  # noqa: F401\n")
    run = lint(tmp_path)
    assert run.returncode == 1 and "No cycles are allowed in aem_dist.engine" in run.stdout and ".dist -> .loop" in run.stdout, run.stdout[-4000:]
    base = tmp_path / "aem_dist" / "models" / "base.py"  # models must not reach up into engine
    base.write_text(base.read_text() + "\nfrom ..engine import dist as _dist  # noqa: F401,E402\n")
    run = lint(tmp_path)
    assert "aem_dist.models is not allowed to import aem_dist.engine" in run.stdout, run.stdout[-4000:]



def test_no_line_over_160_characters_in_the_package():  # docs/ARCHITECTURE.md; wrap a long text as adjacent literals
    long = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "aem_dist").rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 160]
    assert not long, f"{len(long)} line(s) over 160 characters: {', '.join(long[:20])}"
