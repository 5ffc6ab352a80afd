"""The design's import rules, checked by import-linter with the contracts in pyproject.toml.

``stages -> copilot``, ``stages -> engines``, ``engines -> copilot``; the core (``copilot``)
names no stage and no engine (it resolves them through ``copilot/registry.py``), and ``bench``
is a leaf that nothing in ``copilot``, ``stages`` or ``engines`` imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("copilot", "stages", "engines", "bench")
CONTRACTS = {
    "core": "the core (copilot) imports no stage and no engine",
    "leaf": "bench is a leaf: copilot, stages and engines never import it",
    "engines": "engines do not import stages (stages -> engines -> copilot)",
}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with ``root``'s pyproject.toml, analysing the packages under ``root``
    (first on the path, so a copy shadows the installed tree)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_project_keeps_every_import_contract() -> None:
    res = lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in res.stdout, res.stdout
    assert "0 broken" in res.stdout, res.stdout


def _copy_tree(dst: Path) -> None:
    """The four root packages' Python files and pyproject.toml (no data, no caches)."""
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for pkg in PACKAGES:
        for src in (ROOT / pkg).rglob("*.py"):
            target = dst / src.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def test_a_forbidden_import_breaks_its_contract(tmp_path: Path) -> None:
    """Probe modules in a copy of the tree (never the real one), one per rule: each contract fails
    and names the import that broke it."""
    _copy_tree(tmp_path)
    probes = {
        "copilot/_probe.py": "from stages.motion import MotionStage  # the core naming a stage\n",
        "stages/_forbidden_probe.py": "import bench  # a stage reaching into the bench tools\n",
        "engines/_probe.py": "import stages.motion  # an engine above its stage\n",
    }
    for rel, text in probes.items():
        (tmp_path / rel).write_text(text)
    res = lint_imports(tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    for name in CONTRACTS.values():
        assert f"{name} BROKEN" in out, out
    assert "0 kept, 3 broken" in out, out
    for line in ("copilot._probe -> stages.motion", "stages._forbidden_probe -> bench",
                 "engines._probe -> stages.motion"):
        assert line in out, out


def test_the_copy_without_probes_is_clean(tmp_path: Path) -> None:
    """The same copy with no probe passes: what broke above was the probes, not the copying."""
    _copy_tree(tmp_path)
    res = lint_imports(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
