"""A veth pair into a network namespace of its own: a second "machine" on this one, for tests and benches.

``with veth_pair() as (ns, outer_ip, inner_ip):`` creates a namespace, a veth pair with
one end in it and a random ``10.x.y.0/24`` between them, and removes all of it on the way
out, failure or not.  Run a server inside with ``in_netns(ns, *argv)``; this process stays
outside, so its traffic crosses the veth as a remote client's crosses a wire (no
loopback shortcut, a real interface with its own MTU and queue).

The names and the subnet are random per use, and only what this module created is ever
removed: the machine may be shared.  Without root, or where ``ip netns`` does not work,
there is nothing to create: the tests skip, naming the reason (``veth_pair``'s
*on_unavailable* decides what happens instead; bench/mem.py exits with the reason).
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple, NoReturn


class Veth(NamedTuple):
    ns: str        #: the network namespace (``ip netns exec NS ...``)
    outer_ip: str  #: this side's address, on the veth end left in the root namespace
    inner_ip: str  #: the namespace's address, on its veth end


def in_netns(ns: str, *argv: str) -> list[str]:
    """*argv* as a command that runs inside namespace *ns* (``ip netns exec`` execs it: same pid)."""
    return ["ip", "netns", "exec", ns, *argv]


def unavailable() -> str | None:
    """Why no namespace can be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2): ip netns unavailable"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"ip netns unavailable: {probe.stderr.strip() or probe.returncode}"
    return None


def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


def _ip(*args: str, ns: str | None = None) -> None:
    argv = in_netns(ns, "ip", *args) if ns else ["ip", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {out.stderr.strip()}")


def _subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no route of this machine."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                            timeout=10).stdout.split("\n")
    taken = []
    for line in routes:
        words = line.split()
        dest = words[1] if words and words[0] in ("local", "broadcast", "unicast") and len(words) > 1 else \
            (words[0] if words else "")
        try:
            taken.append(ipaddress.IPv4Network(dest, strict=False))
        except ValueError:
            pass  # "default", blank lines
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for a veth pair after 100 tries")


def _names() -> tuple[str, str, str]:
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    for _ in range(100):
        tag = secrets.token_hex(3)
        ns = f"fabric-{tag}"
        if ns not in existing and not os.path.exists(f"/sys/class/net/fbv{tag}o"):
            return ns, f"fbv{tag}o", f"fbv{tag}i"  # interface names: 15 characters at most
    raise RuntimeError("no free namespace name after 100 tries")


def _kill_leftovers(ns: str) -> list[int]:
    """SIGKILL what still runs in *ns* (only what our own caller started there can be in it)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.split()
    killed = []
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
        except (ValueError, ProcessLookupError):
            pass
    return killed


@contextmanager
def veth_pair(on_unavailable: Callable[[str], NoReturn] = _skip) -> Iterator[Veth]:
    """A namespace joined to this one by a veth pair; everything removed on exit (see the module docstring).

    Without root or ``ip netns``, calls *on_unavailable* with the reason (default: ``pytest.skip``).
    """
    reason = unavailable()
    if reason:
        on_unavailable(reason)
    ns, outer, inner = _names()
    net = _subnet()
    hosts = net.hosts()
    outer_ip, inner_ip = str(next(hosts)), str(next(hosts))
    made_ns = made_link = False
    try:
        add = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=10)
        if add.returncode != 0:
            on_unavailable(f"ip netns unavailable: `ip netns add` failed: {add.stderr.strip()}")
        made_ns = True
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        made_link = True
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{outer_ip}/{net.prefixlen}", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("addr", "add", f"{inner_ip}/{net.prefixlen}", "dev", inner, ns=ns)
        _ip("link", "set", inner, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        yield Veth(ns, outer_ip, inner_ip)
    finally:
        errors = []
        if made_ns:
            _kill_leftovers(ns)  # a namespace with processes in it outlives `ip netns del`
        if made_link:  # deleting one end deletes the pair (if the namespace took the other end)
            out = subprocess.run(["ip", "link", "del", outer], capture_output=True, text=True, timeout=10)
            if out.returncode != 0 and os.path.exists(f"/sys/class/net/{outer}"):
                errors.append(f"ip link del {outer}: {out.stderr.strip()}")
        if made_ns:
            out = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=10)
            if out.returncode != 0:
                errors.append(f"ip netns del {ns}: {out.stderr.strip()}")
        if errors:
            failure = sys.exc_info()[1]
            if failure is None:
                raise RuntimeError("veth pair cleanup failed: " + "; ".join(errors))
            failure.add_note("veth pair cleanup failed too: " + "; ".join(errors))  # never hide the first failure
