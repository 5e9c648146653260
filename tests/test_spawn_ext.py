"""fabric_ext.spawn: clone+exec in C, the child's setup steps, and their failures.

Every test starts real processes; no mock.  The child's view is read back through
a pipe (what /proc says about it), so each assertion is about what the process
really got.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import sys
from pathlib import Path

import psutil
import pytest

from fabric_ext.spawn import MAX_RLIMITS, ChildSetupError, spawn

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

PY = sys.executable
ENV = [f"{k}={v}" for k, v in os.environ.items()]


def run(argv: list[str], **kw: object) -> tuple[int, bytes]:
    """Spawn *argv* with stdout on a pipe; (exit status, output)."""
    r, w = os.pipe()
    try:
        pid, pidfd = spawn(argv[0], argv, kw.pop("env", ENV), stdout=w, **kw)  # type: ignore[arg-type]
    finally:
        os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def py(code: str, **kw: object) -> tuple[int, str]:
    code_, out = run([PY, "-c", code], **kw)
    return code_, out.decode()


def test_exit_code_argv_env_and_own_process_group() -> None:
    code, out = py("import os, sys; print(sys.argv[1:], os.environ['X'], os.getpgid(0) == os.getpid()); sys.exit(3)",
                   env=[*ENV, "X=42"])
    assert code == 3
    assert out.split() == ["[]", "42", "True"]


def test_process_group_minus_one_stays_in_the_parents() -> None:
    _, out = py("import os; print(os.getpgid(0))", process_group=-1)
    assert int(out) == os.getpgid(0)


def test_pidfd_becomes_readable_when_the_child_exits() -> None:
    pid, pidfd = spawn("/bin/true", ["true"], ENV)
    try:
        assert not os.get_inheritable(pidfd)
        assert select.select([pidfd], [], [], 10)[0] == [pidfd]
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(pidfd)


def test_no_descriptor_but_stdio_crosses_exec() -> None:
    leaky = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaky, True)  # what a careless library would leave behind
    try:
        _, out = py("import os\nopen_=[]\nfor fd in range(3, 4096):\n"
                    "    try: os.fstat(fd)\n    except OSError: continue\n    open_.append(fd)\nprint(open_)")
    finally:
        os.close(leaky)
    assert out.strip() == "[]"


def test_stdio_sources_below_three_are_not_clobbered() -> None:
    # stdout of the child from the parent's fd 2 and stderr from fd 1: a naive dup2
    # order would point both at the same file
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    save1, save2 = os.dup(1), os.dup(2)
    try:
        os.dup2(w1, 2)
        os.dup2(w2, 1)
        pid, pidfd = spawn(PY, [PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"], ENV,
                           stdout=2, stderr=1)
    finally:
        os.dup2(save1, 1)
        os.dup2(save2, 2)
        for fd in (save1, save2, w1, w2):
            os.close(fd)
    os.waitpid(pid, 0)
    os.close(pidfd)
    assert os.read(r1, 100) == b"out\n"
    assert os.read(r2, 100) == b"err\n"
    os.close(r1)
    os.close(r2)


def test_stdin_is_dev_null_by_default() -> None:
    _, out = py("import sys; print(repr(sys.stdin.read()))")
    assert out.strip() == "''"


def test_signals_back_to_default() -> None:
    # Python ignores SIGPIPE and SIGXFSZ; the child must not inherit that (an ignored
    # signal stays ignored across exec), nor a blocked mask
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    _, out = run(["/bin/cat", "/proc/self/status"])
    status = dict(line.split(":\t", 1) for line in out.decode().splitlines() if ":\t" in line)
    ignored = int(status["SigIgn"], 16)
    assert not ignored >> (signal.SIGPIPE - 1) & 1
    assert not ignored >> (signal.SIGXFSZ - 1) & 1
    assert int(status["SigBlk"], 16) == 0
    code, _ = run(["/bin/sh", "-c", "kill -USR1 $$"])
    assert code == -signal.SIGUSR1


def test_rlimits_no_new_privs_and_parent_death_signal() -> None:
    _, out = py("import resource, os\nprint(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0])",
                rlimits=[(resource.RLIMIT_NOFILE, 77, 77)], no_new_privs=True, pdeathsig=signal.SIGKILL)
    assert out.split("\n")[:2] == ["(77, 77)", "1"]


def test_infinity_is_accepted_as_python_spells_it() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    _, out = py("import resource; print(resource.getrlimit(resource.RLIMIT_CORE))",
                rlimits=[(resource.RLIMIT_CORE, 0, hard)])
    assert out.strip() == str((0, hard))


def test_cwd() -> None:
    _, out = py("import os; print(os.getcwd())", cwd="/tmp")
    assert out.strip() == os.path.realpath("/tmp")


@pytest.mark.parametrize("name, mode, content, errno_", [
    ("missing", None, b"", errno.ENOENT),
    ("not-executable", 0o644, b"#!/bin/sh\n", errno.EACCES),
    ("garbage", 0o755, b"\x00\x01garbage", errno.ENOEXEC),
])
def test_exec_failures_are_the_errno_s_oserror(tmp_path: Path, name: str, mode: int | None, content: bytes,
                                               errno_: int) -> None:
    path = tmp_path / name
    if mode is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(OSError) as info:
        spawn(path, [name], ENV)
    assert info.value.errno == errno_
    assert info.value.filename == str(path)
    assert type(info.value) is type(OSError(errno_, "x"))  # FileNotFoundError, PermissionError, ...


def test_a_directory_is_not_executable() -> None:
    with pytest.raises(PermissionError):
        spawn("/", ["/"], ENV)


def test_a_failed_setup_step_names_the_step() -> None:
    with pytest.raises(ChildSetupError) as info:
        spawn("/bin/true", ["true"], ENV, cwd="/nonexistent/dir")
    assert info.value.step == "chdir" and info.value.errno == 2
    with pytest.raises(ChildSetupError) as info:
        # a soft limit above the hard one is EINVAL for everyone
        spawn("/bin/true", ["true"], ENV, rlimits=[(resource.RLIMIT_NOFILE, 100, 10)])
    assert info.value.step == "setrlimit"


def test_failed_children_are_reaped() -> None:
    # only this test's children count: the session's nats-server is a child of pytest too
    me = psutil.Process()
    before = {c.pid for c in me.children()}
    for _ in range(50):
        with pytest.raises(FileNotFoundError):
            spawn("/nonexistent", ["x"], ENV)
    left = [(c.pid, c.status()) for c in me.children() if c.pid not in before]
    assert left == [], f"failed spawns left children (zombies are unreaped): {left}"


@pytest.mark.parametrize("argv, env", [
    (["/bin/true", "a\0b"], ENV),
    (["/bin/true"], ["A=b\0c"]),
])
def test_nul_bytes_are_refused_before_anything_runs(argv: list[str], env: list[str]) -> None:
    with pytest.raises(ValueError, match="null"):
        spawn(argv[0], argv, env)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="argv"):
        spawn("/bin/true", [], ENV)
    with pytest.raises(ValueError, match="rlimits"):
        spawn("/bin/true", ["true"], ENV, rlimits=[(resource.RLIMIT_NOFILE, 1, 1)] * (MAX_RLIMITS + 1))
    with pytest.raises(TypeError):
        spawn("/bin/true", ["true", 1], ENV)  # type: ignore[list-item]
