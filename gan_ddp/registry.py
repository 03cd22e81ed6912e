"""Named implementations a config key chooses between: losses, architectures, datasets, evaluators.

Each choice is declared once, beside its code, in that module's registry:

    LOSSES = Registry("loss.kind")

    @LOSSES.register("hinge")
    class Hinge: ...

The config's allowed values and its error for a bad value come from the registry of the key. The config sits
below the modules that implement the choices and must not import them, so it looks a registry up by key
(`registry.lookup("loss.kind")`); `gan_ddp/__init__.py` imports every implementing module first, the way
torchtitan and timm fill their model registries, so a registry is complete whichever module a caller imports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gan_ddp.errors import ConfigError

T = TypeVar("T")

_REGISTRIES: dict[str, Registry] = {}


def check_choice(key: str, value: object, allowed: tuple | list) -> None:
    """The one wording of a bad choice, registry-backed or not."""
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


class Registry(Generic[T]):
    """Name -> implementation for the config key `key`, in declaration order (the first is the default)."""

    def __init__(self, key: str) -> None:
        if key in _REGISTRIES:
            raise RuntimeError(f"a registry for {key} exists already")
        self.key = key
        self._entries: dict[str, T] = {}
        _REGISTRIES[key] = self

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: declare `name` as a value of the key, implemented by the decorated object."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise RuntimeError(f"{self.key}: {name!r} is registered twice")
        self._entries[name] = obj

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, name: str) -> str:
        check_choice(self.key, name, self.names())
        return name

    def __getitem__(self, name: str) -> T:
        self.check(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())


def lookup(key: str) -> Registry:
    """The registry of a config key; an error in the package itself if its module was never imported."""
    try:
        return _REGISTRIES[key]
    except KeyError:
        raise RuntimeError(f"no registry for {key}: gan_ddp/__init__.py must import the module declaring it") from None
