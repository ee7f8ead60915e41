"""Name -> implementation registries, so methods are chosen by name from ``params.yaml``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownChoiceError(ValueError):
    """Raised when a params value names a method that is not registered."""


class Registry(Generic[T]):
    """A named collection of interchangeable implementations (similarities, merge strategies...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the implementation called ``name``; unknown names list the valid ones."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownChoiceError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
