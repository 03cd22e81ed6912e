"""Named implementations a config key chooses between: datasets, architectures, losses, evaluators, augmentations.

Two halves, so that a config is checked without importing torch:

- `Choices`: the values a key may take and the facts the config checks about each, declared once, torch-free,
  in `gan_ddp/choices.py`; the config and the command line read them.
- `Registry`: the code behind each value, registered beside it under a declared name:

      LOSSES = Registry("loss.kind")

      @LOSSES.register("hinge")
      class Hinge: ...

A registry refuses a name its key does not declare, and an implementation whose facts (the fields it shares with
the declared spec, e.g. `per_sample_penalty`) disagree with the declaration. `gan_ddp/__init__.py` imports
`gan_ddp.choices` first, so every key is declared before any implementing module registers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Generic, TypeVar

from gan_ddp.errors import ConfigError

S = TypeVar("S")
T = TypeVar("T")

_CHOICES: dict[str, Choices] = {}
_REGISTRIES: dict[str, Registry] = {}


def check_choice(key: str, value: object, allowed: tuple | list) -> None:
    """The one wording of a bad choice, registry-backed or not."""
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


class Choices(Generic[S]):
    """The values of config key `key`, in order (the first is the default), each with its spec (facts, or None)."""

    def __init__(self, key: str, specs: Mapping[str, S]) -> None:
        if key in _CHOICES:
            raise RuntimeError(f"the values of {key} are declared already")
        self.key = key
        self._specs = dict(specs)
        _CHOICES[key] = self

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def check(self, name: str) -> str:
        check_choice(self.key, name, self.names())
        return name

    def __getitem__(self, name: str) -> S:
        self.check(name)
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def items(self) -> Iterator[tuple[str, S]]:
        return iter(self._specs.items())


class Registry(Generic[T]):
    """Name -> implementation for the declared config key `key`; its names, order and errors are the key's."""

    def __init__(self, key: str) -> None:
        if key in _REGISTRIES:
            raise RuntimeError(f"a registry for {key} exists already")
        self.key = key
        self.choices = lookup(key)
        self._entries: dict[str, T] = {}
        _REGISTRIES[key] = self

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: implement the declared value `name` of the key with the decorated object."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise RuntimeError(f"{self.key}: {name!r} is registered twice")
        if name not in self.choices:
            raise RuntimeError(f"{self.key}: {name!r} is not declared; add it to gan_ddp/choices.py")
        spec = self.choices[name]
        for f in fields(spec) if is_dataclass(spec) else ():
            if hasattr(obj, f.name) and getattr(obj, f.name) != getattr(spec, f.name):
                raise RuntimeError(
                    f"{self.key}: {name!r} has {f.name}={getattr(obj, f.name)!r}, "
                    f"gan_ddp/choices.py declares {getattr(spec, f.name)!r}"
                )
        self._entries[name] = obj

    def names(self) -> tuple[str, ...]:
        return self.choices.names()

    def check(self, name: str) -> str:
        return self.choices.check(name)

    def __getitem__(self, name: str) -> T:
        self.check(name)
        try:
            return self._entries[name]
        except KeyError:
            raise RuntimeError(f"{self.key}: {name!r} is declared but has no implementation") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())


def lookup(key: str) -> Choices:
    """The declared values of a config key; an error in the package itself if gan_ddp/choices.py lacks it."""
    try:
        return _CHOICES[key]
    except KeyError:
        raise RuntimeError(f"no values declared for {key}: declare them in gan_ddp/choices.py") from None
