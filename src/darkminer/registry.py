"""Registries of named classes (erasers, attacks, guidances), filled by a decorator where each is defined."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from darkminer.errors import DarkMinerError

T = TypeVar("T", bound=type)


class Registry(dict[str, T], Generic[T]):
    """``name -> class``. ``register`` is the decorator (a second class under one name is a bug: refused);
    ``lookup`` imports the built-in ones first and says what exists when a name is unknown."""

    def __init__(self, what: str, builtins: str, name_attribute: str = "name") -> None:
        super().__init__()
        self.what, self.builtins, self.name_attribute = what, builtins, name_attribute

    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if name in self:
                raise RuntimeError(f"{self.what} {name!r} registered twice")
            setattr(cls, self.name_attribute, name)
            for key, value in attributes.items():
                setattr(cls, key, value)
            self[name] = cls
            return cls

        return wrap

    def lookup(self, name: str) -> T:
        importlib.import_module(self.builtins)  # registers the built-in ones
        if name not in self:
            raise DarkMinerError(f"unknown {self.what} {name!r}; choose one of {', '.join(sorted(self))}")
        return self[name]
