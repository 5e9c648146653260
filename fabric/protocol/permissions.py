"""Who may publish and subscribe what: every role's NATS permissions, from one table.

With auth on (the default of ``fabric up``), every connection authenticates as an nkey
user, and nats-server enforces the permissions rendered here into ``users.conf``
(:func:`render_users`).  docs/security.md explains the table; tests/test_permissions.py
holds it to what the services and the client really do.

The roles:

* **services** (``allocator``, ``spawner``, ``scheduler``, ``gpu-monitor``), one user per
  service and node (:func:`service_user`; node ``*`` grants every node's subjects):
  subscribe only to their own endpoints -- the cluster-wide ones and their node's --
  in both forms below, publish replies into
  ``_INBOX.>`` and only the few other subjects their work needs, and reach only their
  own JetStream resources (the gpu-monitor writes only its node's registry key);
* **gateway** (one per node, the HTTP gateway): a trusted proxy -- it checks each HTTP
  request's bearer token itself, then sends the request in the token user's user form
  (``fabric.u.<user>.…``), or in the plain form for a token with the ``admin`` scope; it
  reads the telemetry, every task event and ``$SRV``, and keeps the token bucket;
* **client**: publishes requests only in its own user form ``fabric.u.<user>.…`` (so the
  services read an identity NATS authenticated from the subject, never a typed name),
  subscribes only to its own inbox ``_INBOX.<user>.>`` and to the telemetry
  heartbeats; no service subject, no other inbox, no task pull, no JetStream write;
* **admin**: the operator of the fabric -- everything, like root on the nodes;
* **joiner**: the identity of a join token (``fabric join-token``): may only ask to
  join, on ``fabric.join.request``.

The two forms of a request subject: the plain one, ``fabric.<area>…`` (docs/protocol.md),
which with auth on only services and admins may publish (the caller is trusted: the
services act for nobody in particular), and the user form, ``fabric.u.<user>.<area>…``
(:func:`user_subject`), whose ``<user>`` token is the authenticated caller
(:func:`split_user`).  With auth off both reach the same endpoints and the user token is
only a name.  Part of :mod:`fabric.protocol` (stdlib only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .streams import (
    BODY_STREAM,
    GATEWAY_BUCKET,
    LEASE_BUCKET,
    REGISTRY_BUCKET,
    RESULTS_BUCKET,
    STATE_BUCKET,
    TASK_BUCKET,
    WEBHOOK_CONSUMER,
    WEBHOOK_STREAM,
    WEBHOOK_SUBJECT_PREFIX,
    kv_stream,
    object_stream,
)
from .subjects import (
    CORE,
    JOIN_REQUEST,
    MEM,
    NODES,
    PREFIX,
    PROC,
    SRV_PREFIX,
    SRV_VERBS,
    TASK,
    TELEMETRY,
    Proc,
    Task,
)
from .subjects import GATEWAY as GATEWAY_AREA

__all__ = [
    "ALLOCATOR", "SPAWNER", "SCHEDULER", "GPU_MONITOR", "GATEWAY", "SERVICE_ROLES", "CLIENT", "ADMIN", "USER_ROLES",
    "JOINER", "JOINER_USER", "SYSTEM", "SYSTEM_USER",
    "USER_TOKEN", "INBOX", "Permissions", "UserEntry", "valid_user_name", "service_user", "inbox_prefix",
    "user_subject", "split_user", "caller_of", "subject_for", "permissions", "render_users",
]

ALLOCATOR: Final = "allocator"
SPAWNER: Final = "spawner"
SCHEDULER: Final = "scheduler"
GPU_MONITOR: Final = "gpu-monitor"
GATEWAY: Final = "gateway"
#: the roles of the services: one nkey user per service and node
SERVICE_ROLES: Final = (ALLOCATOR, SPAWNER, SCHEDULER, GPU_MONITOR, GATEWAY)
CLIENT: Final = "client"
ADMIN: Final = "admin"
#: the identity of a join token: may only ask to join (``fabric.join.request``)
JOINER: Final = "joiner"
JOINER_USER: Final = "_joiner"
#: a node's way into nats-server's system account (its servers' reports: routes, JetStream meta group); not in
#: the role table: the system account is not the one fabric's subjects live in
SYSTEM: Final = "system"
SYSTEM_USER: Final = "_system"
#: the roles a person's credentials may have (``fabric user add --role``)
USER_ROLES: Final = (CLIENT, ADMIN)

#: the token after ``fabric`` that marks a user-form subject: ``fabric.u.<user>.<area>…``
USER_TOKEN: Final = "u"
#: the first token of every reply subject
INBOX: Final = "_INBOX"

# user names are one subject token; a leading "_" is kept for the services' own users
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_USER_PREFIX: Final = f"{PREFIX}.{USER_TOKEN}."
_PLAIN_PREFIX: Final = f"{PREFIX}."


def valid_user_name(name: str) -> bool:
    """A user name is one subject token: letters, digits, ``_`` and ``-``, not starting with ``_``; at most 64."""
    return bool(_USER_NAME.match(name))


def service_user(role: str, node: str) -> str:
    """The user a service of *role* on *node* is (``_allocator.n1``): never a person's name.

    Two tokens, so its inbox ``_INBOX._allocator.n1`` can be granted per node or, with
    *node* ``*``, for every node at once (the test suite's servers do).
    """
    return f"_{role}.{node}"


def inbox_prefix(user: str) -> str:
    """Where *user*'s replies arrive: ``_INBOX.<user>`` (nats-py ``inbox_prefix``, nats.js ``inboxPrefix``)."""
    return f"{INBOX}.{user}"


def user_subject(user: str, subject: str) -> str:
    """The user form of a plain request subject: ``fabric.mem.alloc`` -> ``fabric.u.<user>.mem.alloc``."""
    if not subject.startswith(_PLAIN_PREFIX):
        raise ValueError(f"{subject!r} is not a fabric subject")
    return _USER_PREFIX + user + "." + subject[len(_PLAIN_PREFIX):]


def split_user(subject: str) -> tuple[str | None, str]:
    """``(user, plain subject)`` of a request subject; ``(None, subject)`` for the plain form."""
    if not subject.startswith(_USER_PREFIX):
        return None, subject
    user, sep, rest = subject[len(_USER_PREFIX):].partition(".")
    if not sep or not user:
        return None, subject
    return user, _PLAIN_PREFIX + rest


def caller_of(subject: str) -> str | None:
    """The user a request came from: the ``<user>`` of its user form, None for the plain form (a trusted caller).

    On every request's path: the plain form costs one ``startswith``.
    """
    return split_user(subject)[0] if subject.startswith(_USER_PREFIX) else None


def subject_for(user: str | None, subject: str) -> str:
    """The subject a client of *user* sends a request for *subject* on: its user form; the plain one without a
    user (an admin, a fabric without auth), and anything that is not a fabric subject as it is (``$SRV``)."""
    if user is None or not subject.startswith(_PLAIN_PREFIX):
        return subject
    return user_subject(user, subject)


@dataclass(frozen=True)
class Permissions:
    """The subjects a user may publish to and subscribe to (NATS wildcards allowed)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class UserEntry:
    """One user of ``users.conf``: its name (for the comment), public nkey and permissions."""

    name: str
    role: str
    nkey: str
    permissions: Permissions | None  # None: everything (admins)


# -- the pieces the table is made of ------------------------------------------------------------


def _forms(*subjects: str) -> tuple[str, ...]:
    """Both forms of each request subject: plain and any user's (``fabric.u.*.…``)."""
    out: list[str] = []
    for s in subjects:
        out += [s, _USER_PREFIX + "*." + s[len(_PLAIN_PREFIX):]]
    return tuple(out)


def _area(area: str, node: str, *cluster_verbs: str) -> tuple[str, ...]:
    """A service's endpoints in *area*: its cluster-wide verbs and everything node-scoped on *node*."""
    return _forms(*(f"{PREFIX}.{area}.{v}" for v in cluster_verbs), f"{PREFIX}.{area}.{node}.>")


def _srv(service: str) -> tuple[str, ...]:
    """The ``$SRV`` subjects a service answers: every service's, its name's, its instance's."""
    return tuple(f"{SRV_PREFIX}.{verb}{tail}" for verb in SRV_VERBS for tail in ("", f".{service}", f".{service}.*"))


_JS_INFO: Final = "$JS.API.INFO"


def _js_read(stream: str) -> tuple[str, ...]:
    """Read a stream: info, get one message, direct get, watch (an ordered consumer and its flow control)."""
    return (f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.*", f"$JS.API.CONSUMER.DELETE.{stream}.*",
            f"$JS.FC.{stream}.>")


def _js_own(stream: str) -> tuple[str, ...]:
    """Keep a stream one's own: create it when missing (the kit does after every reconnect), read it."""
    return (f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}", *_js_read(stream))


def _kv_own(bucket: str) -> tuple[str, ...]:
    """Own KV *bucket*: keep it and write any key (put, create, compare-and-swap, delete)."""
    return (*_js_own(kv_stream(bucket)), f"$KV.{bucket}.>")


def _objects_own(bucket: str) -> tuple[str, ...]:
    """Own object store *bucket*: keep it, put and get objects, delete (purge) them."""
    stream = object_stream(bucket)
    return (*_js_own(stream), f"$JS.API.STREAM.PURGE.{stream}", "$JS.API.STREAM.NAMES", f"$O.{bucket}.>")


def _inbox(user: str) -> str:
    return inbox_prefix(user) + ".>"


_REPLIES: Final = f"{INBOX}.>"  # a service answers whoever asked (the reply subject is the asker's inbox)


# -- the table ----------------------------------------------------------------------------------


def permissions(role: str, *, user: str = "", node: str = "") -> Permissions | None:
    """The permissions of *user* in *role*, or of the *role* service on *node*; None for an admin (everything)."""
    if role == ADMIN:
        return None
    if role == JOINER:  # a join token: it can ask to join, and read the answer, nothing else
        return Permissions(publish=(JOIN_REQUEST,), subscribe=(_inbox(JOINER_USER),))
    if role == CLIENT:
        if not valid_user_name(user):
            raise ValueError(f"invalid user name {user!r}: letters, digits, '_' and '-', not starting with '_'")
        return Permissions(
            publish=(f"{_USER_PREFIX}{user}.>", f"{SRV_PREFIX}.>", _JS_INFO, *_js_read(kv_stream(REGISTRY_BUCKET))),
            # its own task events (the scheduler splits the feed by owner); the telemetry heartbeats
            subscribe=(_inbox(user), f"{_USER_PREFIX}{user}.{TASK}.{Task.EVENTS}", f"{PREFIX}.{TELEMETRY}.*"),
        )
    if role not in SERVICE_ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join((*SERVICE_ROLES, *USER_ROLES))}")
    if not node:
        raise ValueError(f"a {role} user belongs to a node")
    own = (_inbox(service_user(role, node)), *_srv(role))
    if role == ALLOCATOR:
        return Permissions(publish=(_REPLIES,), subscribe=(*own, *_area(MEM, node, "alloc")))
    if role == SPAWNER:
        return Permissions(
            publish=(_REPLIES,
                     f"{PREFIX}.{PROC}.{node}.{Proc.OUT}.*",  # a process's output, announced
                     f"{PREFIX}.{TASK}.{Task.PULL}",  # asks the scheduler for work, reports results
                     _JS_INFO, *_objects_own(RESULTS_BUCKET)),
            subscribe=(*own, *_area(PROC, node, "spawn"), *_area(CORE, node, "load")),
        )
    if role == SCHEDULER:
        verbs = (Task.SUBMIT, Task.MAP, Task.GET, Task.WAIT, Task.CANCEL, Task.LIST, Task.RESULT, Task.RELEASE)
        return Permissions(
            publish=(_REPLIES,
                     f"{PREFIX}.{TASK}.{Task.EVENTS}", f"{_USER_PREFIX}*.{TASK}.{Task.EVENTS}",
                     f"{PREFIX}.{TASK}.{Task.BODY}.*", f"{WEBHOOK_SUBJECT_PREFIX}.*",
                     _JS_INFO, *_js_own(BODY_STREAM), *_js_own(WEBHOOK_STREAM), *_kv_own(TASK_BUCKET),
                     *_kv_own(LEASE_BUCKET),
                     *_kv_own(STATE_BUCKET), *_objects_own(RESULTS_BUCKET), *_js_read(kv_stream(REGISTRY_BUCKET))),
            subscribe=(*own, *_forms(*(f"{PREFIX}.{TASK}.{v}" for v in verbs)),
                       # plain only: the nodes' pull, the gateways' webhook reports -- never a user's
                       f"{PREFIX}.{TASK}.{Task.PULL}", f"{PREFIX}.{TASK}.{Task.CALLBACK}",
                       f"{PREFIX}.{TASK}.{Task.STATS}"),
        )
    if role == GATEWAY:
        # acts for the user a token names (its user form), or as the fabric's admin for an admin token (the plain
        # request subjects of the areas it serves over HTTP); every service's $SRV figures; the token bucket
        plain = (*(f"{PREFIX}.{TASK}.{v}" for v in (Task.SUBMIT, Task.GET, Task.WAIT, Task.CANCEL, Task.LIST,
                                                      Task.RESULT, Task.RELEASE, Task.CALLBACK, Task.STATS)),
                 f"{PREFIX}.{MEM}.alloc", f"{PREFIX}.{MEM}.*.*", f"{PREFIX}.{NODES}.>",
                 f"{PREFIX}.{GATEWAY_AREA}.*.info")  # the other gateways: the cluster's topology
        return Permissions(
            publish=(_REPLIES, f"{_USER_PREFIX}*.>", *plain, f"{SRV_PREFIX}.>", _JS_INFO,
                     *_kv_own(GATEWAY_BUCKET), *_js_read(kv_stream(REGISTRY_BUCKET)),
                     # the webhooks to deliver: a durable pull consumer shared by every gateway
                     *_js_own(WEBHOOK_STREAM), f"$JS.API.CONSUMER.DURABLE.CREATE.{WEBHOOK_STREAM}.{WEBHOOK_CONSUMER}",
                     f"$JS.API.CONSUMER.MSG.NEXT.{WEBHOOK_STREAM}.{WEBHOOK_CONSUMER}",
                     f"$JS.ACK.{WEBHOOK_STREAM}.{WEBHOOK_CONSUMER}.>"),
            subscribe=(*own, *_area(GATEWAY_AREA, node, "info"), f"{PREFIX}.{TELEMETRY}.*",
                       f"{PREFIX}.{TASK}.{Task.EVENTS}",
                       f"{_USER_PREFIX}*.{TASK}.{Task.EVENTS}"),
        )
    # gpu-monitor: heartbeats out, everyone's in (the registry); only its own node's registry key
    return Permissions(
        publish=(_REPLIES, f"{PREFIX}.{TELEMETRY}.{node}", f"$KV.{REGISTRY_BUCKET}.{node}",
                 _JS_INFO, *_js_own(kv_stream(REGISTRY_BUCKET))),
        subscribe=(*own, *_area(NODES, node, "list", "get", "devices"), f"{PREFIX}.{TELEMETRY}.*"),
    )


# -- users.conf ---------------------------------------------------------------------------------


def _list(subjects: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in subjects) + "]"


def render_users(entries: Iterable[UserEntry], system: Iterable[str] = ()) -> str:
    """The ``authorization`` block nats-server reads (``include``d by nats.conf), one nkey user per entry.

    *system*: public nkeys let into the system account ``SYS`` (declared here with ``system_account``;
    fabric's own users stay in the global account, where its streams are).
    json.dumps quotes each string the way the NATS config parser reads it.
    """
    lines = ["# written by fabric from its role table (fabric/protocol/permissions.py); rewritten at every change",
             "authorization {", "  users: ["]
    for e in entries:
        lines.append(f"    # {e.name} ({e.role})")
        if e.permissions is None:
            lines.append(f"    {{nkey: {json.dumps(e.nkey)}}}")
            continue
        lines.append(f"    {{nkey: {json.dumps(e.nkey)}, permissions: {{")
        lines.append(f"      publish: {{allow: {_list(e.permissions.publish)}}}")
        lines.append(f"      subscribe: {{allow: {_list(e.permissions.subscribe)}}}")
        lines.append("    }}")
    lines += ["  ]", "}"]
    keys = list(system)
    if keys:
        lines += ["accounts {", "  SYS {", "    users: ["]
        lines += [f"      {{nkey: {json.dumps(k)}}}" for k in keys]
        lines += ["    ]", "  }", "}", "system_account: SYS"]
    lines.append("")
    return "\n".join(lines)
