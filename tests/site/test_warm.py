"""The site's warm task process (radfed.site.warm): real processes, real forks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from radfed.site.warm import PRELOAD, WarmStarter

#: A task entry point that writes what it saw to the file its last argument names.
_TASK = """
import json, os, subprocess, sys


def main():
    out = sys.argv[-1]
    child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    with open("/proc/self/cmdline", "rb") as handle:
        cmdline = handle.read().decode()
    import torch_like
    seen = {
        "argv": sys.argv,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cmdline": cmdline,
        "subprocess": child.stdout.strip(),
        "preloaded": sorted(m for m in ("torch", "radfed.site.runtime") if m in sys.modules),
        "cuda": "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized(),
        "imported_once": torch_like.IMPORTS,
    }
    with open(out + ".tmp", "w") as handle:
        json.dump(seen, handle)
    os.replace(out + ".tmp", out)
    return 3
"""
#: Counts its imports in a file: a preloaded module is imported once for every task.
_TORCH_LIKE = """
import os, pathlib
counter = pathlib.Path(os.environ["IMPORT_COUNTER"])
counter.write_text(str(int(counter.read_text() or "0") + 1) if counter.exists() else "1")
IMPORTS = int(counter.read_text())
"""


@pytest.fixture
def task_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Modules the warm process can import (on its PYTHONPATH)."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "warm_task.py").write_text(textwrap.dedent(_TASK))
    (folder / "torch_like.py").write_text(textwrap.dedent(_TORCH_LIKE))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    monkeypatch.setenv("IMPORT_COUNTER", str(tmp_path / "imports"))
    return tmp_path


@pytest.fixture
def starter() -> Iterator[WarmStarter]:
    made = WarmStarter(preload=("torch_like",), target="warm_task:main")
    try:
        yield made
    finally:
        made.close()


def _result(path: Path, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the task never ran"
        time.sleep(0.05)
    found: dict[str, object] = json.loads(path.read_text())
    return found


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_each_task_is_a_fork_with_its_arguments_and_the_token_on_no_command_line(
    task_module: Path, starter: WarmStarter
) -> None:
    # Prepare
    token = "secret-task-token-4711"
    outs = [task_module / f"task-{i}.json" for i in range(3)]

    # Execute
    started = [
        starter.start(["flwr-clientapp", "--token", token, "--insecure", str(out)]) for out in outs
    ]
    seen = [_result(out) for out in outs]

    # Assert: three tasks, three processes forked from the one warm process, which imported
    # the preloaded module once; each got its own arguments
    assert started == [True, True, True]
    assert starter.ready_info["ready"] is True
    assert {s["ppid"] for s in seen} == {starter.pid}
    assert len({s["pid"] for s in seen}) == 3
    assert [s["argv"] for s in seen] == [
        ["flwr-clientapp", "--token", token, "--insecure", str(out)] for out in outs
    ]
    assert {s["imported_once"] for s in seen} == {1}
    # the token travelled over the socket pair: no command line holds it
    assert all(token not in str(s["cmdline"]) for s in seen)
    assert starter.pid is not None
    assert token not in Path(f"/proc/{starter.pid}/cmdline").read_bytes().decode()
    # a task may start and wait for processes of its own (SIGCHLD is reset in the child)
    assert {s["subprocess"] for s in seen} == {"42"}


def test_a_warm_process_that_died_is_replaced(task_module: Path, starter: WarmStarter) -> None:
    # Prepare: a warm process that answered once, then is killed
    assert starter.start(["flwr-clientapp", str(task_module / "first.json")])
    _result(task_module / "first.json")
    first = starter.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while starter.pid is not None and time.monotonic() < deadline:  # polls (and reaps) it
        time.sleep(0.1)

    # Execute
    started = starter.start(["flwr-clientapp", str(task_module / "second.json")])

    # Assert: a new warm process ran the task
    assert started
    assert _result(task_module / "second.json")["ppid"] == starter.pid != first


def test_a_warm_process_that_cannot_start_leaves_tasks_to_start_cold(
    task_module: Path,
) -> None:
    # Prepare: a preload that fails to import
    broken = WarmStarter(preload=("no_such_module_anywhere",), target="warm_task:main")
    try:
        # Execute
        started = broken.start(["flwr-clientapp", str(task_module / "never.json")])
    finally:
        broken.close()

    # Assert: the SuperExec is told to start the task itself
    assert started is False
    assert not (task_module / "never.json").exists()


def test_the_warm_process_ends_with_the_superexec_that_started_it(task_module: Path) -> None:
    # Prepare: a stand-in SuperExec that starts a warm process, says its PID, and waits
    code = (
        "import sys, time\n"
        "from radfed.site.warm import WarmStarter\n"
        "s = WarmStarter(preload=('torch_like',), target='warm_task:main')\n"
        "s.check()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        warm = int(parent.stdout.readline())

        # Execute: the SuperExec is killed, with no chance to clean up
        os.kill(parent.pid, signal.SIGKILL)
    finally:
        parent.kill()
        parent.wait(timeout=30)

    # Assert
    assert _gone(warm), "the warm process outlived its SuperExec"


def test_the_site_runtime_preloads_torch_without_touching_cuda(
    task_module: Path,
) -> None:
    # Prepare: the real preload list, before the test's task
    real = WarmStarter(preload=(*PRELOAD, "torch_like"), target="warm_task:main")
    try:
        # Execute
        assert real.start(["flwr-clientapp", str(task_module / "real.json")])
        seen = _result(task_module / "real.json", timeout=300)
    finally:
        real.close()

    # Assert: the task found torch and radfed's runtime imported, and no CUDA context
    assert seen["preloaded"] == ["radfed.site.runtime", "torch"]
    assert seen["cuda"] is False


_IMPORTS_AFTER_FORK = """
import importlib, json, os, sys
from radfed.site.warm import PRELOAD
for name in PRELOAD:
    importlib.import_module(name)
import flwr.supernode.runtime.run_clientapp as process
before = set(sys.modules)
def pulled(client):  # where Flower's task asks its SuperNode for its message: stop here
    print(json.dumps(sorted(set(sys.modules) - before)), flush=True)
    os._exit(0)
process.pull_task_input = pulled
from radfed.site.runtime import main
if os.fork() == 0:
    sys.argv = ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:1", "--token", "t" * 16,
                "--insecure"]
    main()
    os._exit(1)
os.wait()
"""


def test_a_forked_task_imports_nothing_before_it_asks_for_its_message(tmp_path: Path) -> None:
    # Each module a task imports after the fork is imported again by every task: the warm
    # process's PRELOAD must hold everything the task imports up to its first request
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER_FORK],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert lines == ["[]"], lines
