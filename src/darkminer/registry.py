"""Registries of named classes (erasers, attacks, guidances), filled by a decorator where each is defined:
a built-in one when its name is first looked up (only its module is imported: a mistyped name is refused
before torch and diffusers load), one's own by importing the module that defines them (``load_plugin``)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from darkminer.errors import DarkMinerError

T = TypeVar("T", bound=type)
PLUGIN_MODULE_PREFIX = "darkminer_plugin_"  # the module name a plugin file is imported under


class Registry(dict[str, T], Generic[T]):
    """``name -> class``. ``register`` is the decorator: a second class under one name is refused, unless it
    is the same class defined again (its module reloaded, a notebook cell run twice), which replaces it.
    ``builtins`` names each built-in class's module (``name -> module``), which ``lookup`` imports when the
    name is first asked for; an unknown name is refused with what exists, having imported nothing. As a dict
    it holds (and ``in`` finds) what is registered so far, a built-in only once looked up: ``names()`` lists
    every name ``lookup`` takes."""

    def __init__(self, what: str, builtins: Mapping[str, str], name_attribute: str = "name") -> None:
        super().__init__()
        self.what, self.builtins, self.name_attribute = what, dict(builtins), name_attribute

    def register(self, name: str, **attributes: Any) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if not isinstance(name, str) or not name.strip():
                raise DarkMinerError(f"a {self.what} is registered under a name (a non-empty string), got {name!r}")
            home = self.builtins.get(name)
            if home is not None and cls.__module__ != home and not cls.__module__.startswith(f"{home}."):
                raise DarkMinerError(f"{self.what} {name!r} is a built-in one ({home}); register {_where(cls)} "
                                     "under another name")
            if name in self and _where(self[name]) != _where(cls):
                raise DarkMinerError(f"{self.what} {name!r} is already registered (by {_where(self[name])}); "
                                     f"register {_where(cls)} under another name")
            setattr(cls, self.name_attribute, name)
            for key, value in attributes.items():
                setattr(cls, key, value)
            self[name] = cls
            return cls

        return wrap

    def names(self) -> list[str]:
        """Every name that ``lookup`` takes: the built-in ones and those registered."""
        return sorted({*self.builtins, *self})

    def lookup(self, name: str) -> T:
        if isinstance(name, str) and name not in self and name in self.builtins:
            importlib.import_module(self.builtins[name])  # registers it
        if not isinstance(name, str) or name not in self:  # a damaged record's name may be any JSON value
            raise DarkMinerError(f"unknown {self.what} {name!r}; choose one of {', '.join(self.names())} (one of "
                                 "your own is known once the module registering it is imported: --plugin MODULE)")
        return self[name]


def _where(cls: type) -> str:
    """A class by its module, or by its file where that is a plugin file (imported under a name of our making)."""
    module = sys.modules.get(cls.__module__)
    if cls.__module__.startswith(PLUGIN_MODULE_PREFIX) and getattr(module, "__file__", None):
        return f"{cls.__qualname__} in {module.__file__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def load_plugin(spec: str) -> None:
    """Import ``spec``, a module name (``my_erasers``) or a Python file (``./my_erasers.py``), so that the
    erasers and attacks it registers (``register_eraser``, ``register_attack``) can be named: the command
    line's ``--plugin``."""
    if not spec.endswith(".py") and ("/" in spec or os.sep in spec):
        raise DarkMinerError(f"plugin {spec}: give a .py file's path or a module name")
    try:
        if spec.endswith(".py"):
            _import_file(Path(spec))
        else:
            importlib.import_module(spec)
    except DarkMinerError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name != spec:  # a module the plugin imports is missing
            raise DarkMinerError(f"plugin {spec}: {exc}") from exc
        raise DarkMinerError(f"plugin {spec}: no module of that name on the Python path (the darkminer command "
                             "does not look in the current folder); give the .py file's path") from exc
    except Exception as exc:  # the plugin's own code failed: its error, in one line, with where it was raised
        raise DarkMinerError(f"plugin {spec} failed while importing: {type(exc).__name__}: {exc}{_line_of(exc, spec)}") from exc


def _line_of(exc: Exception, spec: str) -> str:
    """Where in the plugin ``exc`` was raised (its file's last frame; for a module, the last frame), as
    " (FILE, line N)"; nothing for a SyntaxError, whose text says it already."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) or not frames:
        return ""
    own = [f for f in frames if spec.endswith(".py") and Path(f.filename).resolve() == Path(spec).resolve()]
    frame = (own or frames)[-1]
    return f" ({frame.filename}, line {frame.lineno})"


def _import_file(path: Path) -> None:
    """Import a Python file as a module of its own, named after the file and where it is: a plugin called
    ``json.py`` must not stand in for the standard library's, nor two ``m.py`` files for each other, while
    the same file imported again is the same module (its classes replace their earlier selves)."""
    if not path.is_file():
        raise DarkMinerError(f"plugin {path}: no such file")
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"{PLUGIN_MODULE_PREFIX}{path.stem}_{where}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise DarkMinerError(f"plugin {path}: not a Python module file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # while it runs, as an import has it (dataclasses look their module up)
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
