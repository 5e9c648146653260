"""Native executables (UDCS ``NATIVE_EXEC``), stored once per node by their sha256.

A client sends the binary with its digest and the architecture and OS it claims;
the spawner checks the digest (400 on mismatch), the claim against this node
(422 ``wrong_architecture``), and the ELF header against the claim (422 too: a
claim is not proof), then stores it as ``<state-dir>/spawner/blobs/<sha256>``
(mode 0755, written to a temporary name and renamed, so a half-written file is
never run).  A later spawn names the digest only.
"""

from __future__ import annotations

import hashlib
import os
import platform
import struct
from pathlib import Path

from fabric.errors import BadRequest, ExecutableNotFound, WrongArchitecture
from fabric.schema import NativeExec

__all__ = ["BlobStore", "elf_machine", "node_architecture", "ARCH_ALIASES"]

#: ELF e_machine -> canonical architecture name
ELF_MACHINES: dict[int, str] = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64",
                                21: "ppc64", 22: "s390x", 8: "mips"}
#: spellings users send -> canonical name
ARCH_ALIASES: dict[str, str] = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64",
                                "i686": "i386", "x86": "i386", "armv7l": "arm", "ppc64le": "ppc64"}
ELF_OSABI_LINUX = (0, 3)  # System V (what Linux toolchains write) and GNU/Linux


def canonical_arch(name: str) -> str:
    low = name.strip().lower()
    return ARCH_ALIASES.get(low, low)


def node_architecture() -> str:
    return canonical_arch(platform.machine())


def elf_machine(data: bytes) -> tuple[str, int, int]:
    """(architecture, ELF class, OS ABI) from an ELF header; BadRequest if it is not ELF."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        raise BadRequest("a native executable must be an ELF file (no \\x7fELF magic)")
    ei_class, ei_data, osabi = data[4], data[5], data[7]
    if ei_data not in (1, 2):
        raise BadRequest(f"ELF header has an invalid byte order ({ei_data})")
    (machine,) = struct.unpack_from("<H" if ei_data == 1 else ">H", data, 18)
    return ELF_MACHINES.get(machine, f"elf-machine-{machine}"), ei_class, osabi


class BlobStore:
    """The node's stored executables: ``path(sha256)``, ``put(native)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.arch = node_architecture()
        for leftover in root.glob("*.tmp*"):  # a put interrupted by a crash
            leftover.unlink(missing_ok=True)

    def count(self) -> int:
        return sum(1 for p in self.root.iterdir() if len(p.name) == 64)

    def path(self, digest: str) -> Path:
        return self.root / digest

    def check_claim(self, native: NativeExec) -> None:
        claimed = canonical_arch(native.architecture) if native.architecture else ""
        if native.os.strip().lower() not in ("linux", ""):
            raise WrongArchitecture(f"this node runs linux/{self.arch}; the executable is for {native.os!r}",
                                    node_architecture=self.arch)
        if claimed and claimed != self.arch:
            raise WrongArchitecture(f"the executable is for {claimed}; this node is {self.arch}",
                                    node_architecture=self.arch, architecture=claimed)

    def resolve(self, native: NativeExec) -> Path:
        """The stored executable for *native*, storing its data first when given."""
        self.check_claim(native)
        if native.data is not None:
            return self.put(native)
        path = self.path(native.sha256)
        if not path.exists():
            raise ExecutableNotFound(f"no native executable {native.sha256} on this node: send its data once",
                                     sha256=native.sha256)
        return path

    def put(self, native: NativeExec) -> Path:
        data = native.data or b""
        digest = hashlib.sha256(data).hexdigest()
        if digest != native.sha256:
            raise BadRequest(f"sha256 mismatch: the data hashes to {digest}, the request says {native.sha256}")
        arch, ei_class, osabi = elf_machine(data)
        if arch != self.arch:
            claim = f" (claimed {native.architecture})" if native.architecture else ""
            raise WrongArchitecture(f"the ELF header says {arch}{claim}; this node is {self.arch}",
                                    node_architecture=self.arch, architecture=arch)
        if osabi not in ELF_OSABI_LINUX:
            raise WrongArchitecture(f"the ELF header's OS ABI is {osabi}, not Linux", node_architecture=self.arch)
        if arch in ("x86_64", "aarch64", "riscv64", "ppc64", "s390x") and ei_class != 2:
            raise WrongArchitecture(f"a 32-bit ELF cannot be assumed to run on this {self.arch} node",
                                    node_architecture=self.arch)
        path = self.path(digest)
        if path.exists():
            return path
        tmp = path.with_name(f"{digest}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        return path
