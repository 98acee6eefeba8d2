"""The import contract (docs/architecture.md): it holds, and it catches what it forbids.

Each attack copies the package, adds one import that breaks the architecture, and runs
``lint-imports`` on the copy: the gate must fail and name the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo", str(root / "pyproject.toml")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_contract_holds() -> None:
    done = _lint(ROOT)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "added", "named"),
    [
        # the server's code reaching into a site's (inside a function: checked too)
        (
            "central/rounds.py",
            "def _peek():\n    from radfed.site import handlers\n",
            "radfed.central.rounds -> radfed.site.handlers",
        ),
        # the wire contract importing one side of the wire
        ("federation/schema.py", "import radfed.central.strategy\n", "radfed.federation.schema"),
        # the data layer calling the task layer (as data/check.py once did)
        ("data/loading.py", "from radfed.tasks import get_task\n", "radfed.data.loading"),
        # the contract layer loading torch
        ("folders.py", "import torch\n", "radfed.folders -> torch"),
        # a cycle between two modules of one room
        ("bias/values.py", "import radfed.bias.html\n", ".values -> .html"),
    ],
)
def test_the_contract_catches_an_import_against_the_flow(
    tmp_path: Path, module: str, added: str, named: str
) -> None:
    # Prepare
    shutil.copytree(
        ROOT / "radfed", tmp_path / "radfed", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "radfed" / module
    target.write_text(target.read_text() + "\n" + added)

    # Execute
    done = _lint(tmp_path)

    # Assert
    assert done.returncode == 1, done.stdout
    assert "BROKEN" in done.stdout and named in done.stdout
