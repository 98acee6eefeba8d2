"""Every command and every module as a user meets them: each in a fresh Python process.

pytest imports the whole package into one interpreter, so an import cycle is always entered
from the side that works; these tests start a new interpreter for each module and each
command instead, and check what the user sees: an exit code and one line, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest
import typer

import radfed
from radfed.cli import app
from radfed.deployment.pki import SITE_NAME_RULE

PACKAGE = Path(radfed.__file__).parent
#: An argument that stands for a folder the test creates (``{tmp}``) or one that is missing.
MISSING = "{tmp}/no-such-thing"

#: Per command, arguments that reach the command's body and fail there, and a word the
#: error must name. A new command without an entry here fails ``test_every_command_is_tried``.
BAD_INPUT: dict[str, tuple[list[str], str]] = {
    "synth": (["--out", "{tmp}/data", "--dims", "4"], "--dims must be 2 or 3"),
    "simulate": (["--data", MISSING, "--out", "{tmp}/run"], "data root not found"),
    "evaluate": (
        ["--checkpoint", f"{MISSING}.pt", "--data", "{tmp}", "--out", "{tmp}/out"],
        "not found",
    ),
    "explain": (
        ["--checkpoint", f"{MISSING}.pt", "--data", "{tmp}", "--out", "{tmp}/out"],
        "not found",
    ),
    "launch": (
        ["--server", "127.0.0.1:9", "--pki", MISSING, "--out", "{tmp}/run"],
        "no ca.crt",
    ),
    "report": ([MISSING], "holds no bias_report.json"),
    "site index": ([MISSING, "--out", "{tmp}/site"], "export folder not found"),
    "site check": (["{tmp}", "--run-config", "image-size=1"], "'image-size' must be >= 16"),
    "site join": (["--pki", MISSING, "--site", "a", "--data", "{tmp}"], "no-such-thing"),
    "site audit": (["{tmp}"], "has no audit log yet"),
    "site keygen": (["--site", "Bad_Name", "--out", "{tmp}/kit"], SITE_NAME_RULE),
    "pki init": (
        ["--out", "{tmp}/pki", "--server-address", "127.0.0.1:9443", "--sites", "x,synth.json"],
        SITE_NAME_RULE,  # square brackets reach the screen as they are, not as markup
    ),
    "pki add-site": (["a", "--pki", MISSING], "no-such-thing"),
    "pki renew-server": (["--pki", MISSING], "no-such-thing"),
    "server start": (["--pki", MISSING, "--state", "{tmp}/state"], "no-such-thing"),
    "runs list": (["--store", "not-a-url"], "is not a database URL"),
    "runs show": (["nope", "--store", "sqlite:///{tmp}/runs.sqlite"], "no run 'nope'"),
    "runs export-mlflow": ([MISSING, "--tracking-uri", "sqlite:///{tmp}/m.db"], "not a run folder"),
    "store import": ([MISSING, "--store", "sqlite:///{tmp}/runs.sqlite"], "not a run folder"),
    # a store server that is down: named without its password
    "store upgrade": (
        ["--store", "postgresql+psycopg://radfed:secret@127.0.0.1:9/x"],
        "radfed:***@127.0.0.1:9/x cannot be opened",
    ),
    "dashboard": (
        ["--host", "0.0.0.0", "--store", "sqlite:///{tmp}/runs.sqlite"],
        "token",
    ),
}


def _commands(group: click.Group, prefix: str = "") -> Iterator[str]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}"


def _run(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _radfed() -> str:
    return str(Path(sys.executable).parent / "radfed")


def test_every_command_is_tried() -> None:
    assert set(_commands(typer.main.get_group(app))) == set(BAD_INPUT)


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_a_command_fails_with_one_line_and_no_traceback(command: str, tmp_path: Path) -> None:
    # Prepare
    args, named = BAD_INPUT[command]
    argv = [*command.split(), *(a.format(tmp=tmp_path) for a in args)]

    # Execute
    done = _run(_radfed(), *argv, cwd=tmp_path)

    # Assert
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert output.count("\n") == 0, output
    assert output.startswith("error: ") and named in output


def test_python_dash_m_radfed_is_the_same_command(tmp_path: Path) -> None:
    done = _run(sys.executable, "-m", "radfed", "report", str(tmp_path), cwd=tmp_path)
    version = _run(sys.executable, "-m", "radfed", "--version", cwd=tmp_path)

    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {tmp_path} holds no bias_report.json; give the folder of a finished run"
    )
    assert version.returncode == 0 and version.stdout.strip() == radfed.__version__


#: A value read from a header (it may reach an exception's text) and one in a local variable.
HEADER, LOCAL = "PatientName^Jane", "PatientID-0815"


def _break(
    folder: Path, module: str = "radfed.site.evaluate", name: str = "evaluate_site"
) -> dict[str, str]:
    """A ``sitecustomize`` that makes ``module.name`` (``evaluate`` by default) fail
    unexpectedly, with a header value in the exception's text and a patient id in a local
    variable (built, so that no source line shows it)."""
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import {module} as target

            def broken(*args, **kwargs):
                patient = "".join(reversed({LOCAL[::-1]!r}))
                raise RuntimeError("cannot read " + {HEADER!r})

            target.{name} = broken
            """
        )
    )
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


#: Each site command, the function its body calls (broken by ``_break``), and its arguments.
SITE_COMMANDS = {
    "site index": ("radfed.site.index", "index_export", ["{tmp}", "--out", "{tmp}/site"]),
    "site check": ("radfed.site.check", "check_site", ["{tmp}"]),
    "site keygen": (
        "radfed.deployment.site_kit",
        "make_site_keys",
        ["--site", "a", "--out", "{tmp}/kit"],
    ),
    "site join": (
        "radfed.deployment.supernode",
        "join_site",
        ["--pki", "{tmp}", "--site", "a", "--data", "{tmp}"],
    ),
    "site audit": ("radfed.privacy", "verify", ["{tmp}"]),
}


@pytest.mark.parametrize("command", sorted(SITE_COMMANDS))
def test_a_site_command_that_fails_unexpectedly_says_where_not_what(
    command: str, tmp_path: Path
) -> None:
    # Prepare: the command's work fails with a header value in its text and a patient id
    # in a local variable; site audit needs a log to get that far
    module, name, args = SITE_COMMANDS[command]
    custom = tmp_path / "custom"
    custom.mkdir()
    env = _break(custom, module, name)
    (tmp_path / ".radfed").mkdir()
    (tmp_path / ".radfed" / "audit.jsonl").write_text("")
    argv = [*command.split(), *(a.format(tmp=tmp_path) for a in args)]

    # Execute
    done = _run(_radfed(), *argv, cwd=tmp_path, env=env)

    # Assert: one line naming the place; no value, no local, no traceback
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1, output
    assert LOCAL not in output and HEADER not in output and "Traceback" not in output
    assert output.startswith("error: unexpected RuntimeError at sitecustomize.py:"), output
    assert output.count("\n") == 0, output


@pytest.mark.parametrize("debug", ["", "1"])
def test_an_unexpected_error_shows_no_local_variables(tmp_path: Path, debug: str) -> None:
    # Prepare
    env = {**_break(tmp_path), "RADFED_DEBUG": debug}
    checkpoint = tmp_path / "round-001.pt"
    checkpoint.write_bytes(b"")

    # Execute
    done = _run(
        _radfed(),
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
        env=env,
    )

    # Assert
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert LOCAL not in output  # no local variable, ever
    if debug:  # the developer asked for the traceback
        assert "Traceback" in output and HEADER in output
    else:  # the user's line says where, not what (the text may quote a header value)
        assert HEADER not in output and "Traceback" not in output
        assert output.strip().startswith("error: unexpected RuntimeError at sitecustomize.py:")
        assert output.strip().count("\n") == 0


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":  # running it is the command (above)
            continue
        if parts[-2:] == ("migrations", "env"):  # Alembic's script: only Alembic runs it
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_in_a_fresh_interpreter(tmp_path: Path) -> None:
    # Prepare: one interpreter per module, as many at a time as there are cores
    modules = _modules()

    # Execute
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        done = dict(
            zip(
                modules,
                pool.map(
                    lambda m: _run(sys.executable, "-c", f"import {m}", cwd=tmp_path), modules
                ),
                strict=True,
            )
        )

    # Assert
    failed = {m: r.stderr.strip().splitlines()[-1:] for m, r in done.items() if r.returncode}
    assert len(modules) > 60 and not failed
