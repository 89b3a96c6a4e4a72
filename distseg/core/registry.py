"""One registry class for every pluggable part (fvcore / timm style).

    PRIORS = Registry("prior")

    @PRIORS.register("slic", params=SlicParams, yields="regions")
    class SlicPrior: ...

    PRIORS.get("slic")            # the registered object
    PRIORS.list()                 # sorted names
    PRIORS.build("slic", **kw)    # call the registered object with keyword arguments
    PRIORS.meta("slic")           # {"params": SlicParams, "yields": "regions", ...}

A duplicate name is refused; an unknown name raises `UnknownNameError` (a `KeyError` and a
`ValueError`, so callers of either style keep working) whose message lists the known names. An entry
may carry a pydantic `params` model: the config section of that component (see distseg.config), and
any other metadata the stage that uses the registry reads (a protocol's headline metric, a prior's
output kind). Nothing here imports the rest of distseg, so any module can register into any registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """A second registration under a name that is already taken."""


class Registry(Generic[T]):
    """Name -> object (a class or a factory), with per-entry metadata."""

    def __init__(self, kind: str, hint: str = ""):
        self.kind = kind  # "prior", "method", ...: used in messages
        self.hint = hint  # appended to the unknown-name message (e.g. "or timm:<model name>")
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T] | T:
        """Register `obj` under `name`, or return a decorator that does (`@REG.register("x")`)."""

        def add(target: T) -> T:
            if name in self._entries and self._entries[name] is not target:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} is already registered (to {_describe(self._entries[name])}); "
                    f"choose another name"
                )
            self._entries[name] = target
            self._meta[name] = dict(meta)
            return target

        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a toy component clean up with this)."""
        self._entries.pop(name, None)
        self._meta.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(self.list()) or "none"
            hint = f", {self.hint}" if self.hint else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r} (known: {known}{hint})")
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def params(self, name: str):
        """The entry's pydantic params model (its config section), or None."""
        return self.meta(name).get("params")

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the registered class or factory with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def list(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.list())})"


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
