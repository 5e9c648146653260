"""Handles are capabilities: only the node's key mints them; any change is detected."""

from __future__ import annotations

import pytest

from fabric.errors import UnknownHandle
from fabric.handles import PERM_R, HandleSigner, parse

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

KEY = bytes(range(32))


def test_mint_parse_verify():
    s = HandleSigner("node-1", KEY)
    tok = s.mint(3, 4160, 17)
    h = parse(tok)
    assert (h.node, h.seg, h.off, h.gen, h.perm, h.writable) == ("node-1", 3, 4160, 17, "rw", True)
    assert s.verify(tok) == h
    ro = s.mint(3, 4160, 17, PERM_R)
    assert not s.verify(ro).writable and ro != tok


@pytest.mark.parametrize("field", range(1, 7))
def test_any_changed_field_breaks_the_mac(field):
    s = HandleSigner("n", KEY)
    parts = s.mint(1, 64, 5).split(":")
    parts[field] = {1: "m", 2: "2", 3: "80", 4: "6", 5: "r", 6: "0" * 32}[field]
    with pytest.raises(UnknownHandle):
        s.verify(":".join(parts))


def test_other_key_or_node_rejects():
    tok = HandleSigner("n", KEY).mint(1, 64, 5)
    with pytest.raises(UnknownHandle):
        HandleSigner("n", bytes(32)).verify(tok)
    with pytest.raises(UnknownHandle):
        HandleSigner("other", KEY).verify(tok)


@pytest.mark.parametrize("tok", ["", "v1", "v2:n:1:2:3:rw:" + "0" * 32, "v1:n:x:2:3:rw:" + "0" * 32,
                                 "v1:n:1:2:3:wx:" + "0" * 32, "v1::1:2:3:rw:" + "0" * 32, "v1:n:1:2:3:rw:00",
                                 "v1:" + "n" * 300, 12345, None])
def test_malformed(tok):
    with pytest.raises(UnknownHandle):
        parse(tok)  # type: ignore[arg-type]


def test_short_key_refused():
    with pytest.raises(ValueError):
        HandleSigner("n", b"short")
