"""Sync twins generated from async methods: the one place the sync client restates nothing.

``rstat = sync_method(AsyncFabricClient.rstat)`` in a sync class makes a method that runs
the async one on the twin's loop (``self._run(self.aio.rstat(...))``), with the async
method's docstring and its signature, in which every async type is replaced by its sync
twin (:data:`TWINS`).  *wrap* turns an async result into its twin (an
``AsyncRemoteBuffer`` into a ``RemoteBuffer``), *convert* each argument into what the
async method takes (a ``RemoteBuffer`` into its handle).  ``tests/test_client_parity.py``
checks every sync/async pair against :func:`sync_signature`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, overload

R = TypeVar("R")
W = TypeVar("W")

#: an async type's name -> its sync twin's: the only way a sync signature may differ
TWINS = {
    "AsyncFabricClient": "FabricClient",
    "AsyncRemoteBuffer": "RemoteBuffer",
    "AsyncRemoteProcess": "RemoteProcess",
    "AsyncCore": "Core",
    "AsyncTaskFuture": "TaskFuture",
    "AsyncIterator": "Iterator",
    "AsyncIterable": "Iterable",
}
_TWIN_RE = re.compile(r"\b(" + "|".join(TWINS) + r")\b")


def sync_annotation(annotation: Any) -> Any:
    """*annotation* (a string: every client module postpones them) with the async types replaced by their twins."""
    if isinstance(annotation, str):
        return _TWIN_RE.sub(lambda m: TWINS[m.group(1)], annotation)
    return annotation


def sync_signature(afn: Callable[..., Any]) -> inspect.Signature:
    """The signature a sync twin of *afn* has: the same parameters, async types replaced by their twins."""
    sig = inspect.signature(afn)
    params = [p.replace(annotation=sync_annotation(p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=sync_annotation(sig.return_annotation))


def _same(value: Any) -> Any:
    return value


@overload
def sync_method(afn: Callable[..., Coroutine[Any, Any, R]], *,
                convert: Callable[[Any], Any] = ...) -> Callable[..., R]: ...
@overload
def sync_method(afn: Callable[..., Coroutine[Any, Any, Any]], wrap: Callable[[Any, Any], W], *,
                convert: Callable[[Any], Any] = ...) -> Callable[..., W]: ...


def sync_method(afn: Callable[..., Coroutine[Any, Any, Any]], wrap: Callable[[Any, Any], Any] | None = None, *,
                convert: Callable[[Any], Any] = _same) -> Callable[..., Any]:
    """A method running ``self.aio.<name>(...)`` through ``self._run``; see the module docstring."""
    name = afn.__name__

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        args = tuple(convert(a) for a in args)
        kwargs = {k: convert(v) for k, v in kwargs.items()}
        out = self._run(getattr(self.aio, name)(*args, **kwargs))
        return out if wrap is None else wrap(self, out)

    method.__name__ = name
    method.__qualname__ = name
    method.__doc__ = afn.__doc__
    method.__signature__ = sync_signature(afn)  # type: ignore[attr-defined]  # read by inspect.signature
    return method
