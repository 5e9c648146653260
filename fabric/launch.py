"""How fabric starts one of its own Python modules as a child process.

``python -m pkg.mod`` puts the working directory first on the child's
``sys.path``.  Run from a source checkout -- or from any directory that holds a
``fabric/``, ``services/`` or ``fabric_ext/`` folder -- the child would import
those instead of the installed packages (an unbuilt ``fabric_ext`` there fails
with ``ImportError: cannot import name 'wire'``).  Every child fabric runs by
module (the supervisor's services, the spawner's warm workers) is therefore
started through :func:`module_launch`:

* ``-P`` (Python >= 3.11) keeps the working directory off ``sys.path``;
* the child runs in a directory the caller chooses (the supervisor: the state
  directory), which is what keeps the working directory out on Python 3.10,
  where ``-m`` puts the child's *own* working directory first;
* ``PYTHONPATH`` names the directory this ``fabric`` was imported from (unless
  the interpreter finds it anyway, as a site directory), so the child imports the
  same code as its parent, and relative ``PYTHONPATH`` entries are made absolute
  so they keep their meaning in the child's working directory.

Only the standard library is imported here: the supervisor uses this before it
imports anything else.
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ModuleLaunch", "module_launch", "package_root", "SERVICE_MODULES_ENV"]

#: JSON object ``{"name": "module"}`` that replaces or adds the modules ``fabric up`` runs as
#: services (tests, development); read by the supervisor, and not configuration (fabric.config)
SERVICE_MODULES_ENV = "FABRIC_SERVICE_MODULES"

#: ``-P`` (and ``PYTHONSAFEPATH``) exist from Python 3.11 on; 3.10 rejects the flag
SAFE_PATH_FLAG = ["-P"] if sys.version_info >= (3, 11) else []


@dataclass(frozen=True)
class ModuleLaunch:
    """What to pass to :class:`subprocess.Popen`: ``Popen(l.argv, cwd=l.cwd, env=l.env)``."""

    argv: list[str]
    cwd: str | None  # None: the caller's working directory
    env: dict[str, str]


def package_root() -> str:
    """The directory that holds the ``fabric`` package this process imported."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site_dirs() -> set[str]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return {os.path.realpath(d) for d in dirs}


def module_launch(module: str, args: Sequence[str] = (), *, cwd: str | os.PathLike[str] | None,
                  env: Mapping[str, str] | None = None, python: str | None = None) -> ModuleLaunch:
    """The command, working directory and environment that run ``python -m module args...`` safely.

    *cwd* should be a directory fabric owns (it must not hold a ``fabric``,
    ``services`` or ``fabric_ext`` folder); None keeps the caller's, for a child
    of a process that already runs in such a directory.  *env* defaults to
    ``os.environ``; *python* to this interpreter (another one must be the same
    Python version: it gets the same flags).
    """
    child_env = dict(os.environ if env is None else env)
    # relative entries would change meaning in the child's working directory, and an
    # empty one *is* the working directory
    paths = [os.path.abspath(p) for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    root = package_root()
    if root not in paths and os.path.realpath(root) not in _site_dirs():
        paths.insert(0, root)
    if paths:
        child_env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        child_env.pop("PYTHONPATH", None)
    exe = python or sys.executable
    return ModuleLaunch(
        argv=[exe, *SAFE_PATH_FLAG, "-m", module, *args],
        cwd=None if cwd is None else os.path.abspath(cwd),
        env=child_env,
    )
