"""The wheel a site administrator installs holds every file the package has, not only its
Python modules (the dashboard's templates and scripts, the store's migration template)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import radfed

PACKAGE = Path(radfed.__file__).parent
ROOT = PACKAGE.parent


def test_the_wheel_holds_every_file_of_the_package(tmp_path: Path) -> None:
    # Prepare: the package's own files, caches left out
    expected = {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }

    source = tmp_path / "source"  # the build writes beside its sources: a copy of them
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, source / "radfed", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)

    # Execute: build the wheel as pip does for an installation (offline: the build
    # backend is the one installed)
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")]
    subprocess.run(
        [sys.executable, "-m", "pip", *build, str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    # Assert
    (wheel,) = (tmp_path / "dist").glob("radfed-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("radfed/")}
    assert expected - shipped == set()
    assert "radfed/store/migrations/script.py.mako" in shipped
