"""Who may act on what: the checks every service makes with the caller the kit read (:attr:`Request.caller`).

Part of the service kit.  With auth on, a request in the user form carries its caller,
whom NATS authenticated (:mod:`fabric.protocol.permissions`); the services then

* make the caller the owner of what it creates (a process, a task, a block's quota
  account), whatever name the request typed;
* let the caller act only on what it owns (:func:`check_owner`): waiting on, killing,
  cancelling or listing another user's things is 403;
* publish on the caller's behalf only into the caller's inbox (:func:`check_reply_subject`):
  a spawn's ``stream_to`` or a task's ``notify`` elsewhere is 403, or alice could make
  a service publish into bob's inbox, or onto a service subject with the service's
  own permissions.

A plain-form request (``caller`` None) comes from an admin or a service (or from anyone
on a fabric without auth): trusted, it may act on anything.
"""

from __future__ import annotations

from .errors import PermissionDenied
from .protocol.permissions import inbox_prefix

__all__ = ["check_owner", "check_reply_subject"]


def check_owner(caller: str | None, owner: str, what: str) -> None:
    """403 unless *caller* is trusted (None) or owns *what* (its *owner*)."""
    if caller is not None and owner != caller:
        raise PermissionDenied(f"{what} belongs to another user: {caller!r} may act only on its own")


def check_reply_subject(caller: str | None, subject: str | None, field: str) -> None:
    """403 unless *subject* (a ``stream_to``, a ``notify``) is in *caller*'s inbox, or the caller is trusted."""
    if caller is None or subject is None:
        return
    inbox = inbox_prefix(caller) + "."
    if not subject.startswith(inbox):
        raise PermissionDenied(f"{field} {subject!r} is not in the caller's inbox: a service publishes for "
                               f"{caller!r} only under {inbox}… (docs/protocol.md, \"Connecting\")")
