"""Who a user's warm workers run as: ``sandbox.client_user``, with an interpreter that user can run.

A user's *processes* already run as ``sandbox.client_user`` (default ``nobody``, with
``no_new_privs``) when the spawner is root (:meth:`SpawnerService.user_sandbox
<services.spawner.service.SpawnerService.user_sandbox>`).  The same goes for the code a
user runs in warm workers: a core they load, their ``python`` tasks, their ``opencl``
tasks.  Such a worker (:class:`~.pool_workers.RingWorker` given a :class:`RunAs`) gets its
ring files chowned to that user, is started as that user (no supplementary groups), in
``/`` rather than the state directory, with a HOME of that user's own (:func:`make_home`:
an OpenCL CPU driver keeps its kernel cache there), and sets ``no_new_privs`` before it
reads a job.

The interpreter: ``sandbox.client_python``, else the first of the spawner's own and the
system's Python of the same version (``/usr/bin/pythonX.Y``, ``/usr/local/bin/pythonX.Y``)
that user can reach by the file modes (:func:`reachable`).  One it cannot run (under
``/root``, mode 0700) refuses the worker with a message naming the setting.  A
different interpreter of the same Python version (Debian's ``/usr/bin/python3.11``
beside a pyenv build, say) imports fabric and its packages from the spawner's own site
directories (:func:`launch`), which that user must be able to read.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import site
import sys
import tempfile
from dataclasses import dataclass

from fabric.launch import SAFE_PATH_FLAG, package_root

from .sandbox import resolve_user

__all__ = ["RunAs", "client_run_as", "launch", "cannot_run", "reachable", "make_home", "drop_home", "sweep_homes",
           "HOME_PREFIX"]

#: run in the worker's interpreter before the worker module: the spawner's site directories (their .pth
#: files too: an editable install's finder), the directory fabric was imported from, no_new_privs, then the module
_BOOT = """\
import ctypes, json, runpy, site, sys
spec = json.loads(sys.argv[1])
if list(sys.version_info[:2]) != spec["version"]:
    sys.exit(f"fabric worker: this interpreter is Python {sys.version_info[0]}.{sys.version_info[1]}, the spawner's "
             f"is {spec['version'][0]}.{spec['version'][1]}: sandbox.client_python must be the same version")
for d in spec["site"]:
    site.addsitedir(d)
sys.path[0:0] = [p for p in spec["path"] if p not in sys.path]
if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit("fabric worker: prctl(PR_SET_NO_NEW_PRIVS) failed")
sys.argv = [spec["module"], *sys.argv[2:]]
runpy.run_module(spec["module"], run_name="__main__", alter_sys=True)
"""


#: how a worker home's name starts (then the spawner's pid)
HOME_PREFIX = "fabric-worker-home-"


@dataclass(frozen=True)
class RunAs:
    """The OS user (and its interpreter) a client's workers run as."""

    user: str
    uid: int
    gid: int
    python: str
    #: the workers' HOME: a directory of that user's (0700), made by :func:`make_home`, for what libraries
    #: cache there (an OpenCL CPU driver's compiled kernels); "" until made
    home: str = ""


def make_home(run_as: RunAs) -> RunAs:
    """*run_as* with a HOME of its own: a fresh directory in the system's temporary directory, owned by the user.

    Named ``fabric-worker-home-<spawner pid>-...``: the homes of spawners that died without
    removing theirs (kill -9) are removed first (:func:`sweep_homes`).
    """
    sweep_homes()
    home = tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{os.getpid()}-")
    os.chown(home, run_as.uid, run_as.gid)
    return dataclasses.replace(run_as, home=home)


def sweep_homes() -> list[str]:
    """Remove the worker homes whose spawner is gone; their paths."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), HOME_PREFIX + "*")):
        try:
            pid = int(os.path.basename(path)[len(HOME_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:  # alive, someone else's
            continue
    return removed


def drop_home(run_as: RunAs | None) -> None:
    """Remove the HOME :func:`make_home` made (the spawner stops)."""
    if run_as is not None and run_as.home:
        shutil.rmtree(run_as.home, ignore_errors=True)


def client_run_as(client_user: str, client_python: str) -> RunAs | None:
    """The :class:`RunAs` of a client's workers on this node; None when they run as the spawner.

    None when the spawner is not root (it could not switch user; no worker runs as root) or the
    operator trusts users with root (``client_user`` ``root`` or empty).  KeyError for an
    unknown user.
    """
    if os.geteuid() != 0 or client_user in ("", "root"):
        return None
    uid, gid = resolve_user(client_user)
    if not client_python:
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        candidates = [sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
        client_python = next((c for c in candidates if reachable(c, uid, gid)), sys.executable)
    return RunAs(user=client_user, uid=uid, gid=gid, python=client_python)


def reachable(path: str, uid: int, gid: int) -> bool:
    """Whether user *uid* (group *gid*, no others) may execute *path* by the modes of it and its directories."""
    try:
        real = os.path.realpath(path)
        parts = real.split(os.sep)
        for i in range(1, len(parts)):
            st = os.stat(os.sep.join(parts[:i]) or os.sep)
            if not _allows(st, uid, gid, 0o1):  # search each directory
                return False
        st = os.stat(real)
    except OSError:
        return False
    return _allows(st, uid, gid, 0o5)  # read and execute the file


def _allows(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & bits == bits


def launch(run_as: RunAs, module: str, args: list[str]) -> list[str]:
    """The command line that runs ``python -m module args...`` in *run_as*'s interpreter (see the docstring)."""
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    spec = {"version": list(sys.version_info[:2]), "site": dirs, "path": [package_root()], "module": module}
    return [run_as.python, *SAFE_PATH_FLAG, "-c", _BOOT, json.dumps(spec), *args]


def cannot_run(run_as: RunAs, exc: OSError) -> str:
    """What to tell a user whose worker could not be started as *run_as* (its interpreter is out of reach)."""
    return (f"this node runs users' code as {run_as.user!r} (sandbox.client_user), who cannot run the interpreter "
            f"{run_as.python} ({exc.strerror or exc}): set sandbox.client_python to a Python "
            f"{sys.version_info[0]}.{sys.version_info[1]} that user can run (with fabric's packages readable to "
            "it), or sandbox.client_user = \"root\" to trust this fabric's users with root on the node")
