"""Build the Cython extensions in fabric_ext/.

Build switches (environment variables, read at build time):

* ``FABRIC_DEBUG=1``    -- compile with ``-O0 -g``, define the ``FABRIC_DEBUG`` C macro
  (extra internal consistency checks) and turn on Cython's bounds/wraparound checks.
* ``FABRIC_SANITIZE=1`` -- compile and link with AddressSanitizer and UBSan.  Run the
  tests with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)`` (see tests/sanitize.sh).
"""

from __future__ import annotations

import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

DEBUG = os.environ.get("FABRIC_DEBUG", "") not in ("", "0")
SANITIZE = os.environ.get("FABRIC_SANITIZE", "") not in ("", "0")

compile_args = ["-std=c11", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
link_args: list[str] = []
macros: list[tuple[str, str | None]] = []
if DEBUG:
    compile_args += ["-O0", "-g3"]
    macros.append(("FABRIC_DEBUG", "1"))
else:
    compile_args += ["-O2"]
if SANITIZE:
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    compile_args += flags + ["-g"]
    link_args += flags
    macros.append(("FABRIC_SANITIZE", "1"))

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}


def ext(name: str) -> Extension:
    return Extension(
        f"fabric_ext.{name}",
        [f"fabric_ext/{name}.pyx"],
        include_dirs=["fabric_ext/include"],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


# The repository keeps services/ at the top, one folder per service as the design names
# them; installed, they are fabric.services.<name>, under fabric's own namespace where a
# generic top-level name like "services" cannot collide with another project's.
# fabric_ext/include holds the C headers (package data, no Python): named here so setuptools
# ships it as a data-only package rather than warn that it looks importable
PACKAGES = (find_packages(include=["fabric", "fabric.*", "fabric_ext", "fabric_ext.*"]) + ["fabric_ext.include"]
            + ["fabric.services"] + [f"fabric.services.{p}" for p in find_packages("services")])

setup(
    packages=PACKAGES,
    package_dir={"fabric.services": "services"},
    ext_modules=cythonize(
        [ext("arena"), ext("wire"), ext("ring"), ext("spawn"), ext("dataplane")],
        compiler_directives=directives,
        compile_time_env={"FABRIC_DEBUG": DEBUG},
    ),
)
