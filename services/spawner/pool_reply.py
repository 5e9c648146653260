"""A publish-only NATS connection that the pools' reader threads answer jobs on directly.

Why: a warm job's result arrives in a reader thread (``Consumer.pop()``, GIL
released).  Handing it to the event loop first costs a loop wake-up, a future, a
task switch and nats-py's flusher turn: on the 2-core machine of docs/benchmarks.md
an empty ``run`` took 5-16 % longer (22-75 us) without the link, in the same runs
(``python bench/job_lane.py``; it was a third of the round trip when the link came).
So the reader thread publishes a successful ``run`` job's output itself, on this
second, minimal connection (``PUB <reply> <n>``, one ``sendmsg`` of header, the output
viewed in the ring record, and CRLF), and the loop only does the bookkeeping
afterwards, off the critical path.  Anything else -- errors, batches, a link
that is down -- goes the ordinary way, through the service's nats-py client.

The link speaks just enough of the NATS client protocol: read ``INFO``, send
``CONNECT`` and ``PING``, wait for ``PONG``; a small thread answers the server's
``PING`` s, takes a new ``INFO`` (a config reload) and notices ``-ERR`` and EOF.
Credentials: the service's nkey when it has one (auth on, the default of ``fabric up``:
the server's ``nonce`` signed with the seed, as nats-py signs it), else those of the
URL, presented exactly as nats-py presents them for the service's own connection
(``nats://user:pass@host`` as user and password, ``nats://token@host`` as a token, both
as written, not percent-decoded), so the link authenticates whenever the service does.
The link only publishes replies, which the spawner's permissions allow (``_INBOX.>``).
A server that wants TLS (``tls_required`` in its ``INFO``, or a ``tls://`` URL), a
``ws://`` URL, or one that refuses the credentials (``-ERR 'Authorization Violation'``):
the link gives up for good (:attr:`ReplyLink.usable`), says so once in the log, and
the slow path serves every reply.

Size: the server drops a connection that publishes more than its ``max_payload``
(``-ERR 'Maximum Payload Violation'``), which here would lose the job's reply and
every reply after it until the link reconnects.  So the link reads ``max_payload``
from the server's ``INFO`` and refuses (``publish`` returns False, nothing sent) an
output above :func:`reply_limit`; the loop then answers the job 413 ``too_large``,
as it does for any reply of that size (docs/protocol.md, "Compute cores").
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from typing import Any
from urllib.parse import urlparse

__all__ = ["ReplyLink", "REPLY_HEADROOM", "reply_limit"]

_CRLF = b"\r\n"
#: bytes of a reply's max payload kept for its headers (an error reply's, a failed job's
#: exit code): the server counts headers and body together against ``max_payload``, and a
#: job's output must get the same answer whether it succeeded or failed, by link or loop
REPLY_HEADROOM = 4096
#: what a server that announces no ``max_payload`` allows (nats-server's default)
DEFAULT_MAX_PAYLOAD = 1 << 20


def _nkey_auth(seed: str, nonce: str) -> dict[str, str]:
    """The CONNECT fields of nkey authentication: the public key, and the server's nonce signed (base64)."""
    import nkeys

    kp = nkeys.from_seed(bytearray(seed.encode()))
    try:
        return {"nkey": bytes(kp.public_key).decode(), "sig": base64.b64encode(kp.sign(nonce.encode())).decode()}
    finally:
        kp.wipe()


def reply_limit(max_payload: int) -> int:
    """The largest job output (or ``map`` results frame) a reply may carry under *max_payload*."""
    return max(max_payload - REPLY_HEADROOM, 0)


class ReplyLink:
    """``publish(subject, data)`` from any thread; False when the link is down (use the slow path)."""

    def __init__(self, url: str, name: str, log: Any, seed: str | None = None) -> None:
        self.url = url
        #: the nkey seed the service authenticates with (``SU…``), or None
        self._seed = seed
        self.name = name
        self.log = log
        self.up = False
        #: False once the link can never work here (TLS, another scheme): no more tries
        self.usable = True
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.published = 0
        #: the server's max payload, from its INFO (at connect, and when it sends a new one)
        self.max_payload = DEFAULT_MAX_PAYLOAD
        #: the largest output this link publishes; a bigger one is left to the loop (413)
        self.reply_limit = reply_limit(DEFAULT_MAX_PAYLOAD)

    def connect(self, timeout: float = 5.0) -> bool:
        """Blocking (run it in a thread): open, authenticate, confirm with PING/PONG."""
        self._drop()  # a reconnect: the old socket goes first
        u = urlparse(self.url)
        if u.scheme not in ("nats", "") or not u.hostname:
            self.usable = False
            self.log.info("job reply link not used", reason=f"scheme {u.scheme!r}")
            return False
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((u.hostname, u.port or 4222), timeout=timeout)
            reader = sock.makefile("rb")
            line = reader.readline(1 << 20)
            if not line.startswith(b"INFO "):
                raise ConnectionError(f"unexpected greeting {line[:40]!r}")
            info = json.loads(line[5:])
            self._set_max_payload(info)
            if info.get("tls_required"):
                self.usable = False
                sock.close()
                self.log.info("job reply link not used", reason="the server requires TLS")
                return False
            opts: dict[str, Any] = {"verbose": False, "pedantic": False, "tls_required": False, "name": self.name,
                                    "lang": "python-fabric-reply", "version": "1", "protocol": 1,
                                    "headers": True, "no_responders": True}
            # as nats-py does for the service's connection (Client._connect_command): the URL's
            # user and password, or its user part alone as a token, not percent-decoded
            if self._seed is not None and info.get("nonce"):  # a server that takes nkeys sends a nonce to sign
                opts.update(_nkey_auth(self._seed, info["nonce"]))
            elif u.username and u.password is not None:
                opts["user"], opts["pass"] = u.username, u.password
            elif u.username:
                opts["auth_token"] = u.username
            sock.sendall(b"CONNECT " + json.dumps(opts).encode() + _CRLF + b"PING" + _CRLF)
            while True:
                line = reader.readline(1 << 20)
                if line.startswith(b"PONG"):
                    break
                if not line or line.startswith(b"-ERR"):
                    text = line.decode("utf-8", "replace").strip() or "closed"
                    if "authorization" in text.lower() or "authentication" in text.lower():
                        # credentials do not change by retrying: stop here, not a warning every 2 s
                        self.usable = False
                    raise ConnectionError(text)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ValueError, ConnectionError) as exc:
            if sock is not None:
                sock.close()
            self.log.warning("job reply link not used", error=str(exc), retried=self.usable)
            return False
        with self._lock:
            self._sock = sock
        self.up = True
        self._thread = threading.Thread(target=self._serve, args=(reader,), name="core-reply-link", daemon=True)
        self._thread.start()
        return True

    def _serve(self, reader: Any) -> None:
        """Answer the server's PINGs; notice -ERR and EOF."""
        try:
            while True:
                line = reader.readline(1 << 20)
                if not line:
                    break
                if line.startswith(b"PING"):
                    with self._lock:
                        if self._sock is not None:
                            self._sock.sendall(b"PONG" + _CRLF)
                elif line.startswith(b"INFO "):  # the server's settings changed (a config reload)
                    self._set_max_payload(json.loads(line[5:]))
                elif line.startswith(b"-ERR"):
                    self.log.warning("job reply link error", error=line.decode("utf-8", "replace").strip())
                    break
        except (OSError, ValueError):
            pass
        self.up = False

    def _set_max_payload(self, info: dict[str, Any]) -> None:
        mp = info.get("max_payload")
        if isinstance(mp, int) and mp > 0:
            self.max_payload = mp
            self.reply_limit = reply_limit(mp)

    def publish(self, subject: bytes, data: Any) -> bool:
        """Publish *data* (bytes-like) to *subject* (bytes); False when nothing was sent: the link
        is down, or *data* is above :attr:`reply_limit` (the server would drop the link for it)."""
        if not self.up or len(data) > self.reply_limit:
            return False
        head = b"PUB %b %d\r\n" % (subject, len(data))
        with self._lock:
            sock = self._sock
            if sock is None:
                return False
            # counted before the send: the reply may reach its client before this thread runs again
            self.published += 1
            try:
                total = len(head) + len(data) + 2
                sent = sock.sendmsg((head, data, _CRLF))
                if sent < total:  # a big output on a full socket buffer: send the rest
                    rest = memoryview(b"".join((head, bytes(data), _CRLF)))[sent:]
                    sock.sendall(rest)
            except OSError as exc:
                self.published -= 1
                self.up = False
                self.log.warning("job reply link lost", error=str(exc))
                # a PUB cut half-way leaves nothing usable on this socket: the link stays down
                # (the job's client sees a lost reply, as with any broken connection)
                sock.close()
                self._sock = None
                return False
        return True

    def close(self) -> None:
        self.usable = False
        self._drop()

    def _drop(self) -> None:
        self.up = False
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the PING thread
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

