"""Name -> class registries shared by regularizers, rewards, tasks, advantage estimators.

A registry is a small dict with a decorator and an error that lists valid names, so a typo in
YAML is caught at config time with the list of choices (never a KeyError deep in training).
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # used in error messages, e.g. "regularizer"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            from alignreg.config import ConfigError

            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
