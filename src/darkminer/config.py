"""Config dataclasses: plain data, validated when built, loadable from JSON or YAML files."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from darkminer.errors import ConfigError
from darkminer.io import read_text

C = TypeVar("C", bound="Config")


@dataclasses.dataclass
class Config:
    """Base of every config. Subclasses override :meth:`validate` and call the ``check_*`` helpers."""

    def __post_init__(self) -> None:
        # Types first, however the config was built (constructor, from_dict, replace): a float where an
        # int belongs would otherwise fail deep inside a run, or not at all.
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            setattr(self, field.name, _typed(type(self), field.name, getattr(self, field.name), hints[field.name]))
            if field.name == "seed":
                check_seed(self, self.seed)
        self.validate()

    def validate(self) -> None:  # overridden where there is something to check
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} options must be a mapping of option: value, got {type(data).__name__}")
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid options: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def coerce(cls: type[C], value: C | Mapping[str, Any] | str | os.PathLike | None) -> C:
        """``value`` as this config: itself, built from a mapping of options or from a JSON/YAML file's path;
        None gives the defaults."""
        if isinstance(value, cls):
            return value
        if value is None or isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, str | os.PathLike):
            return cls.from_file(value)
        raise ConfigError(f"expected a {cls.__name__}, a mapping of its options or a config file's path, got "
                          f"{type(value).__name__}")

    @classmethod
    def from_file(cls: type[C], path: str | Path | None, **overrides: Any) -> C:
        data = load_config_file(path) if path else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), **changes})


def fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON/YAML fits a type annotation, as config fields are checked."""
    return _matches(value, hint)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from JSON/YAML) fits the annotation ``hint``; containers item by item."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # NaN and inf are no setting
        return (isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
                and (isinstance(value, int) or math.isfinite(value)))
    if hint is Path:
        return isinstance(value, (str, Path))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        items = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        if origin is tuple and len(items) > 1:  # a fixed-length tuple: one annotation per position
            return len(value) == len(items) and all(_matches(v, a) for v, a in zip(value, items, strict=True))
        return not items or all(_matches(v, items[0]) for v in value)
    if origin is dict:
        keys_and_values = typing.get_args(hint)
        return isinstance(value, dict) and (not keys_and_values or all(
            _matches(k, keys_and_values[0]) and _matches(v, keys_and_values[1]) for k, v in value.items()))
    if isinstance(hint, type) and issubclass(hint, Config):
        return isinstance(value, hint)  # a mapping is built into one by _typed
    target = origin or hint
    return not isinstance(target, type) or isinstance(value, target)


def _typed(cls: type, name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint``; a number written as a string ("1e-3", which YAML reads as text)
    becomes that number, a numpy or torch number a Python one, a path a string where a string belongs, and a
    mapping where a config belongs (``lora: {rank: 8}``) that config, checked as any other."""
    nested = _config_class(hint)
    if nested is not None and isinstance(value, Mapping):
        try:
            return nested.from_dict(value)
        except ConfigError as exc:
            raise ConfigError(f"{cls.__name__}.{name}: {exc}") from None
    if _matches(value, hint):
        return value
    if isinstance(value, list | tuple | dict):  # items as at the top level: a Path or numpy number inside a list
        plain = _plain_items(value)
        if _matches(plain, hint):
            return plain
    if _is_scalar(value):  # np.int64(3), torch.tensor(0.5)
        plain = value.item()
        if _matches(plain, hint):
            return plain
    if isinstance(value, os.PathLike) and _matches("", hint):
        return os.fspath(value)
    if isinstance(value, str) and _matches(1.0, hint):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and _matches(number, hint):
            return number
    one = f" ({ONE_IS_A_LIST}: {name}: [{value}])" if not isinstance(value, list) and _matches([value], hint) else ""
    raise ConfigError(f"{cls.__name__}.{name} must be {_describe(hint)}, got {value!r}{one}")


ONE_IS_A_LIST = "a single one is a list too"  # YAML's `concepts: blood` for `concepts: [blood]`


def _config_class(hint: Any) -> type[Config] | None:
    """The Config class ``hint`` names (alone, or beside None), else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    classes = [arg for arg in args if isinstance(arg, type) and issubclass(arg, Config)]
    return classes[0] if len(classes) == 1 else None


def _is_scalar(value: Any) -> bool:
    """A numpy or torch number (0-d), which JSON and the checks above know only as its Python value."""
    return getattr(value, "ndim", None) == 0 and hasattr(value, "item")


def _plain_items(value: Any) -> Any:
    """A container with its paths as strings and its numpy/torch numbers as Python numbers, at any depth."""
    if isinstance(value, dict):
        return {_plain_items(k): _plain_items(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain_items(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value.item() if _is_scalar(value) else value


_NOUNS: dict[Any, tuple[str, str]] = {  # singular, plural: what a config value of this type is, in words
    float: ("a finite number", "finite numbers"), int: ("a whole number", "whole numbers"),
    bool: ("true or false", "true/false values"), str: ("a string", "strings"), Path: ("a path", "paths"),
    type(None): ("null", "nulls"), Any: ("any value", "values"), dict: ("a mapping", "mappings"),
    list: ("a list", "lists"),
}


def _describe(hint: Any, plural: bool = False) -> str:
    """The annotation ``hint`` in words for an error message ("a finite number or null", "a list of strings"),
    rather than Python's spelling of the type."""
    if isinstance(hint, type) and issubclass(hint, Config):
        return f"{'mappings' if plural else 'a mapping'} of {hint.__name__} options"
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # null last; a whole number is a number, a path a string
        covered = ({int} if float in args else set()) | ({Path} if str in args else set())
        kept = sorted((arg for arg in args if arg not in covered), key=lambda arg: arg is type(None))
        return " or ".join(_describe(arg, plural) for arg in kept)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (list, tuple):
        items = [arg for arg in args if arg is not Ellipsis]
        lists = "lists" if plural else "a list"
        if origin is tuple and len(items) > 1:
            return f"{lists} of {len(items)} items ({', '.join(_describe(arg) for arg in items)})"
        return f"{lists} of {_describe(items[0], plural=True)}" if items else lists
    if origin is dict and args:
        return f"{'mappings' if plural else 'a mapping'} of {_describe(args[0], True)} to {_describe(args[1], True)}"
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a folder; give a JSON or YAML file' if path.is_dir() else 'does not exist'}")
    text = read_text(path, "config file")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or "not valid YAML"
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def check_argument(name: str, value: Any, hint: Any) -> None:
    """An API argument checked against its annotation as config fields are: one line that names it, rather
    than a TypeError deep inside."""
    if not _matches(value.item() if _is_scalar(value) else value, hint):
        raise ConfigError(f"{name} must be {_describe(hint)}, got {value!r}")


SEED_LIMIT = 2**32  # config seeds are 0 .. 2**32 - 1, as numpy's legacy seeds
PROMPT_SEED_LIMIT = 2**64  # a prompt's own seed (a CSV's evaluation_seed): torch's whole range


def check_seed(owner: object, seed: int, name: str = "seed", limit: int = SEED_LIMIT) -> None:
    """``owner``: the config the seed belongs to, or the text that names it."""
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < limit):
        where = f"{type(owner).__name__}.{name}" if not isinstance(owner, str) else owner
        raise ConfigError(f"{where} must be a whole number in 0 .. 2**{limit.bit_length() - 1} - 1, got {seed!r}")


def check_positive(owner: object, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{type(owner).__name__}.{name} must be > 0, got {value}")


# DDIM samples a subset of the training schedule's timesteps, which is 1000 for every model darkminer loads
# (Stable Diffusion 1.x/2.x, the testbed); more sampling steps than that fail inside diffusers.
MAX_SAMPLING_STEPS = 1000


def check_sampling_steps(owner: object, **values: int | None) -> None:
    """Sampling step counts (None: the model's default) in 1 .. MAX_SAMPLING_STEPS."""
    for name, value in values.items():
        if value is not None and not 1 <= value <= MAX_SAMPLING_STEPS:
            raise ConfigError(f"{type(owner).__name__}.{name} must be 1 .. {MAX_SAMPLING_STEPS} (DDIM takes a subset of "
                              f"the model's {MAX_SAMPLING_STEPS} training timesteps), got {value}")


def check_non_negative(owner: object, **values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{type(owner).__name__}.{name} must be >= 0, got {value}")


def check_choice(owner: object, name: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{type(owner).__name__}.{name} must be one of {list(choices)}, got {value!r}")


def check_unique(owner: object, name: str, values: Sequence[Any], key: Callable[[Any], Any] | None = None) -> None:
    """Each of ``values`` once: a name given twice would be run twice, or written as two columns of one
    number. With ``key`` (e.g. a folder name), two values with the same key are the same too."""
    seen: dict[Any, Any] = {}
    for value in values:
        k = key(value) if key else value
        if k in seen:
            twice = f"{value!r} twice" if seen[k] == value else f"{seen[k]!r} and {value!r}, which name one folder"
            raise ConfigError(f"{type(owner).__name__}.{name} lists {twice}; name each once")
        seen[k] = value
