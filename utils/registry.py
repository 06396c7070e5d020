"""Name → implementation registries.

A config names a task, datamodule, backbone or head by a string; the matching registry turns it into
a class or factory. Adding an implementation is one new file plus one ``@REGISTRY.register("name")``.

An entry describes itself: ``@HEADS.register("setr_pup", aux_heads=True, check_config=...)`` sets those
attributes on the registered factory, and ``config.validation`` reads them (``check_config(cfg)``: the
component's own check of a config that chose it, a one-line problem naming the flag, or None).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A config named something no registry entry provides."""

    def __init__(self, kind: str, name: str, valid: Iterable[str], hint: str = ""):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        message = f"unknown {kind} {name!r}; valid: {', '.join(self.valid)}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class Registry(Generic[T]):
    """A named collection of factories of one kind (``"task"``, ``"backbone"``, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        """Register ``obj`` under ``name``; each keyword becomes an attribute of ``obj`` (what the entry says
        about itself, e.g. ``check_config=``)."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            for key, value in attributes.items():
                setattr(obj, key, value)
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name`` (for tests and plugins that register temporarily)."""
        return self._entries.pop(name)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, entry) in registration order."""
        return iter(list(self._entries.items()))

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
