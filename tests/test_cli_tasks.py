"""``fabric submit / tasks / task / cancel`` as a user runs them: real processes, no mocks.

One fabric (embedded nats-server with JetStream on a free port, the real spawner,
gpu-monitor and scheduler) is started with ``fabric up -d`` in its own state directory
for the module; each test runs the CLI as a subprocess against it and checks what it
prints and how it exits: a submit and its record, ``--wait`` with the process's output
and exit code, 422 infeasible and bad flags (exit 2), a cancel while ``--wait`` follows
the task, 409 for a cancel of an ended task, 404 for an unknown id, ``tasks`` as a table
and as JSON lines, ``tasks --watch`` redrawn after a change and stopped by SIGINT, and no
scheduler at all.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._nats import env_with_repo, realm
from tests._spawner import processes_using

pytestmark = pytest.mark.slow

ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _env() -> dict[str, str]:
    env = env_with_repo()
    # FABRIC_CREDENTIALS too: a command aimed at a test's `fabric up` uses that fabric's admin credentials
    for name in ("FABRIC_NATS_URL", "FABRIC_STATE_DIR", "FABRIC_NODE", "FABRIC_CREDENTIALS"):
        env.pop(name, None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fabric.cli", *args]


def fabric(command: str, state_dir: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m fabric.cli COMMAND ARGS... --state-dir DIR``, its output captured as text."""
    return subprocess.run(_cli(command, *args, "--state-dir", str(state_dir)), env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def fabric_submit(state_dir: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    """``fabric submit --state-dir DIR ARGS...`` (the options before the command), stdout as bytes."""
    return subprocess.run(_cli("submit", "--state-dir", str(state_dir), *args), env=_env(), capture_output=True,
                          timeout=timeout)


def record(state_dir: Path, task_id: str) -> dict[str, Any]:
    res = fabric("task", state_dir, task_id, "--json")
    assert res.returncode == 0, res.stderr
    rec: dict[str, Any] = json.loads(res.stdout)
    return rec


def ended(state_dir: Path, task_id: str, deadline_s: float = 60) -> dict[str, Any]:
    """The task's record once it has ended (polled with ``fabric task --json``; a hang fails the test)."""
    give_up = time.monotonic() + deadline_s
    while True:
        rec = record(state_dir, task_id)
        if rec["state"] in ("succeeded", "failed", "cancelled", "dead") or time.monotonic() > give_up:
            return rec
        time.sleep(0.1)



@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A fabric with a scheduler: its state directory and its node's name."""
    state_dir = tmp_path_factory.mktemp("fabric-tasks")
    res = fabric("up", state_dir, "-d", "--nats-port", "0", "--services", "spawner,gpu-monitor,scheduler",
                 "--timeout", "60")
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        node = json.loads((state_dir / "state.json").read_text())["node"]
        yield state_dir, node
    finally:
        fabric("down", state_dir, "--grace", "5")
        for proc in processes_using(state_dir):  # only what this fabric started: its command lines name the dir
            proc.kill()


# -- fabric submit ----------------------------------------------------------------------------------------------


def test_submit_prints_the_id_and_the_task_runs(up: tuple[Path, str]) -> None:
    state_dir, node = up
    res = fabric_submit(state_dir, "--", "sh", "-c", "echo hi")
    assert res.returncode == 0, res.stderr
    task_id = res.stdout.decode().strip()
    assert ID.match(task_id), res.stdout
    rec = ended(state_dir, task_id)
    assert (rec["kind"], rec["state"], rec["exit_code"]) == ("exec", "succeeded", 0)
    assert base64.b64decode(rec["result"]) == b"hi\n"
    assert rec["attempts"][0]["node"] == node


def test_submit_wait_prints_the_output_and_passes_the_options(up: tuple[Path, str]) -> None:
    state_dir, node = up
    # no `--`: the options end at the command's first word, so its own `-c` is its own
    res = fabric_submit(state_dir, "--wait", "--priority", "7", "--cpus", "0.5", "--mem", "1MiB", "--node", node,
                        "--retries", "1", "--timeout", "120", "--key", "cli-wait-1",
                        "sh", "-c", r"printf 'a\000b\n'")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"a\x00b\n"  # the bytes as the process wrote them
    task_id = re.search(rb"task ([A-Za-z0-9_-]+) ", res.stderr)
    assert task_id, res.stderr
    rec = record(state_dir, task_id.group(1).decode())
    assert (rec["priority"], rec["retries"], rec["timeout_s"], rec["key"]) == (7, 1, 120.0, "cli-wait-1")
    assert (rec["resources"]["cpus"], rec["resources"]["mem"], rec["resources"]["node"]) == (0.5, 1 << 20, node)
    # the same key again: the same task, nothing new runs
    again = fabric_submit(state_dir, "--key", "cli-wait-1", "--", "sh", "-c", "echo other")
    assert again.returncode == 0 and again.stdout.decode().strip() == task_id.group(1).decode()


def test_submit_wait_exits_with_the_code_of_a_failing_command(up: tuple[Path, str]) -> None:
    state_dir, _ = up
    res = fabric_submit(state_dir, "--wait", "--", "sh", "-c", "echo no; echo why >&2; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout == b"no\n"
    assert b"failed" in res.stderr and b"code 3" in res.stderr


def test_submit_infeasible_names_the_requirement_and_exits_2(up: tuple[Path, str]) -> None:
    state_dir, node = up
    res = fabric_submit(state_dir, "--gpus", "64", "--", "true")
    assert res.returncode == 2, res.stdout + res.stderr
    assert b"infeasible" in res.stderr and b"gpus=64" in res.stderr and node.encode() in res.stderr
    assert res.stdout == b""
    labelled = fabric_submit(state_dir, "--label", "zone=nowhere", "--wait", "--", "true")
    assert labelled.returncode == 2 and b"zone" in labelled.stderr, labelled.stderr


@pytest.mark.parametrize(("args", "said"), [
    (["--mem", "4XB", "--", "true"], b"not a size"),
    (["--label", "zone", "--", "true"], b"KEY=VALUE"),
    (["--priority", "11", "--", "true"], b"Invalid value for '--priority'"),
    ([], b"no command to run"),
])
def test_submit_bad_input_exits_2(up: tuple[Path, str], args: list[str], said: bytes) -> None:
    res = fabric_submit(up[0], *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert said in res.stderr, res.stderr


# -- fabric cancel / fabric task ----------------------------------------------------------------------------------


def test_cancel_stops_a_running_task_and_its_waiter_exits_1(up: tuple[Path, str]) -> None:
    state_dir, _ = up
    waiter = subprocess.Popen(_cli("submit", "--state-dir", str(state_dir), "--wait", "--", "sleep", "60"),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiter.stderr is not None
        first = waiter.stderr.readline()  # "task <id> <state>; waiting for its end ..."
        found = re.match(r"task ([A-Za-z0-9_-]+) ", first)
        assert found, first
        task_id = found.group(1)
        res = fabric("cancel", state_dir, task_id)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"task {task_id} cancelled"
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 1, out + err
        assert "was cancelled" in err
        assert record(state_dir, task_id)["state"] == "cancelled"
        # cancelled already: 409, said clearly
        again = fabric("cancel", state_dir, task_id)
        assert again.returncode == 1
        assert "has already ended (cancelled)" in again.stderr
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def test_cancel_of_a_finished_task_is_409(up: tuple[Path, str]) -> None:
    state_dir, _ = up
    res = fabric_submit(state_dir, "--wait", "--", "true")
    assert res.returncode == 0, res.stderr
    task_id = re.search(rb"task ([A-Za-z0-9_-]+) ", res.stderr)
    assert task_id, res.stderr
    cancel = fabric("cancel", state_dir, task_id.group(1).decode())
    assert cancel.returncode == 1
    assert "cannot cancel" in cancel.stderr and "has already ended (succeeded)" in cancel.stderr
    assert record(state_dir, task_id.group(1).decode())["state"] == "succeeded"


def test_an_unknown_id_is_404_for_task_and_cancel(up: tuple[Path, str]) -> None:
    state_dir, _ = up
    for command in ("task", "cancel"):
        res = fabric(command, state_dir, "no-such-task")
        assert res.returncode == 1, res.stdout + res.stderr
        assert "no task 'no-such-task'" in res.stderr
        assert res.stdout == ""


def test_task_shows_a_failed_record_readably(up: tuple[Path, str]) -> None:
    state_dir, node = up
    res = fabric_submit(state_dir, "--", "sh", "-c", "echo partial; exit 5")
    task_id = res.stdout.decode().strip()
    assert ended(state_dir, task_id)["state"] == "failed"
    shown = fabric("task", state_dir, task_id)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert re.search(rf"^id\s+{re.escape(task_id)}$", text, re.M)
    assert re.search(r"^state\s+failed$", text, re.M)
    assert re.search(r"^exit code\s+5$", text, re.M)
    assert "attempts" in text and node in text
    assert "job_failed" in text and "code 5" in text
    assert "partial" in text  # the output's preview


# -- fabric tasks -----------------------------------------------------------------------------------------------


def test_tasks_json_lines_and_the_table(up: tuple[Path, str]) -> None:
    state_dir, _ = up
    ids = [fabric_submit(state_dir, "--", "sh", "-c", f"echo {i}").stdout.decode().strip() for i in range(3)]
    for task_id in ids:
        assert ended(state_dir, task_id)["state"] == "succeeded"
    res = fabric("tasks", state_dir, "--json", "--limit", "3")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    # the newest three, one record a line, oldest first
    assert [r["id"] for r in lines] == ids, res.stdout
    assert all(r["state"] == "succeeded" and r["kind"] == "exec" for r in lines), res.stdout
    assert [base64.b64decode(r["result"]) for r in lines] == [b"0\n", b"1\n", b"2\n"], res.stdout
    only = fabric("tasks", state_dir, "--json", "--state", "failed", "--limit", "10000")
    assert only.returncode == 0 and only.stdout, only.stderr
    assert {json.loads(line)["state"] for line in only.stdout.splitlines()} == {"failed"}
    table = fabric("tasks", state_dir, "--limit", "3")
    assert table.returncode == 0, table.stderr
    for header in ("id", "kind", "state", "prio", "node", "attempts", "age", "ran"):
        assert header in table.stdout
    assert all(task_id in table.stdout for task_id in ids), table.stdout
    bad = fabric("tasks", state_dir, "--state", "sleeping")
    assert bad.returncode == 2 and "unknown state" in bad.stderr


def _watch(state_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    """``fabric tasks --watch ARGS...``, started and past its first table (it says so on stderr)."""
    watcher = subprocess.Popen(_cli("tasks", "--state-dir", str(state_dir), "--watch", *args), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert watcher.stderr is not None
    ready = watcher.stderr.readline().decode()  # written once it subscribed and drew the first table
    if "watching fabric.task.events" not in ready:
        watcher.kill()
        out, err = watcher.communicate()
        pytest.fail(f"tasks --watch did not start: {ready}{err.decode()}{out.decode()}")
    return watcher


def _interrupt(watcher: subprocess.Popen[bytes]) -> tuple[str, str]:
    """SIGINT, as Ctrl-C sends it: what the watcher printed, once it exits (killed if it does not within 30 s)."""
    watcher.send_signal(signal.SIGINT)
    try:
        out, err = watcher.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        watcher.kill()
        out, err = watcher.communicate()
    return out.decode(), err.decode()


def test_tasks_watch_draws_the_table_and_stops_on_sigint(up: tuple[Path, str]) -> None:
    state_dir, _ = up
    res = fabric_submit(state_dir, "--wait", "--", "sh", "-c", "echo watched")
    assert res.returncode == 0, res.stderr
    task_id = re.search(rb"task ([A-Za-z0-9_-]+) ", res.stderr)
    assert task_id, res.stderr
    watcher = _watch(state_dir, "--limit", "5")
    out, err = _interrupt(watcher)
    assert watcher.returncode == 0, out + err
    assert "Traceback" not in err
    assert "tasks on nats://" in out and "attempts" in out
    row = next((line for line in out.splitlines() if task_id.group(1).decode() in line), None)
    assert row is not None and "succeeded" in row, out


def test_tasks_watch_json_follows_a_new_task_to_its_end(up: tuple[Path, str]) -> None:
    state_dir, _ = up
    watcher = _watch(state_dir, "--json", "--limit", "5")
    try:
        # a task the watcher's first list could not have shown: only a refresh brings it
        res = fabric_submit(state_dir, "--", "sh", "-c", "sleep 0.3; echo late")
        assert res.returncode == 0, res.stderr
        task_id = res.stdout.decode().strip()
        assert watcher.stdout is not None
        states: list[str] = []
        give_up = time.monotonic() + 60
        buf = b""
        while "succeeded" not in states and time.monotonic() < give_up:
            ready, _, _ = select.select([watcher.stdout], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(watcher.stdout.fileno(), 1 << 16)
            if not chunk:
                break  # it exited
            buf += chunk
            *lines, buf = buf.split(b"\n")
            states += [r["state"] for r in map(json.loads, lines) if r["id"] == task_id]
    finally:
        out, err = _interrupt(watcher)
    assert states and states[-1] == "succeeded", (states, out, err)
    assert watcher.returncode == 0, out + err
    assert "Traceback" not in err


def test_without_a_scheduler_the_commands_say_so(nats_url: str) -> None:
    # as the tests' admin (plain subjects): the session server's users are the test realm's
    env = {**_env(), "FABRIC_CREDENTIALS": str(realm().admin)}
    res = subprocess.run(_cli("tasks", "--nats-url", nats_url), env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no scheduler answers on fabric.task.list" in res.stderr
