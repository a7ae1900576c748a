"""The one exception type for mistakes a user can cause, and the one way settings are checked.

The CLI prints a ``UserError`` as a single line ``error: ...`` and exits with code 1; any
other exception is a bug and shows its traceback. Messages say what went wrong, with which
input, and what to do about it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar


class UserError(Exception):
    """A problem with the user's input or environment, reported as one clear line.

    The message is kept on one line whatever it quotes: a library's complaint about a damaged
    file can hold bytes of that file, line breaks included."""

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).splitlines()))


def is_rust_panic(e: BaseException) -> bool:
    """Whether ``e`` is a panic inside a Rust extension (tiktoken, tokenizers) on input it could
    not handle: pyo3 raises those as ``PanicException``, a ``BaseException`` that ``except
    Exception`` lets through."""
    return type(e).__name__ == "PanicException"


def names(items: Iterable[object]) -> str:
    """Names read from a file (keys, tensor names), joined for a one-line message: each as it is,
    or as its repr() when it holds a line break or another unprintable character."""
    return ", ".join(s if isinstance(s, str) and s.isprintable() else repr(s) for s in items)


# --- settings: one way to check a config dataclass ------------------------------------------------

def flag(name: str) -> str:
    """A setting as the command line spells it: ``n_layer`` -> ``--n-layer``."""
    return "--" + name.replace("_", "-")


def key(name: str) -> str:
    """A setting as a JSON file spells it: the field's own name."""
    return name


def is_int(value: object) -> bool:
    # bool is a subclass of int; `n_layer=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Problems:
    """Every bad setting of one config, collected so that one error reports them all at once, each
    named as the user wrote it: ``spell`` is ``flag`` for settings from the command line
    (``--n-layer``), ``key`` for a file's (``n_layer``), or a spelling of the caller's."""

    def __init__(self, settings: object, spell: Callable[[str], str]) -> None:
        self.settings, self.spell, self.found = settings, spell, []

    def said(self, name: str) -> str:
        """The setting and its value as the user gave them: ``--n-head=5`` or ``n_head=5``."""
        return f"{self.spell(name)}={getattr(self.settings, name)!r}"

    def must(self, ok: bool, name: str, what: str) -> bool:
        """Unless ``ok``, record "NAME must be WHAT, got VALUE"; return ``ok``."""
        if not ok:
            self.found.append(f"{self.spell(name)} must be {what}, got {getattr(self.settings, name)!r}")
        return ok

    def whole(self, *names: str, minimum: int = 1, optional: bool = False) -> None:
        what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        for name in names:
            value = getattr(self.settings, name)
            self.must((optional and value is None) or (is_int(value) and value >= minimum), name, what)

    def positive(self, *names: str, optional: bool = False) -> None:
        for name in names:
            value = getattr(self.settings, name)
            self.must((optional and value is None) or (is_number(value) and value > 0), name, "a positive number")

    def within(self, name: str, low: float, high: float, high_included: bool = False) -> None:
        """``low <= value < high`` (or ``<= high``)."""
        value = getattr(self.settings, name)
        ok = is_number(value) and low <= value and (value <= high if high_included else value < high)
        self.must(ok, name, f"in [{low:g}, {high:g}{']' if high_included else ')'}")

    def choice(self, name: str, choices: Iterable[str]) -> None:
        choices = tuple(choices)
        self.must(getattr(self.settings, name) in choices, name, f"one of {', '.join(choices)}")

    def boolean(self, *names: str, optional: bool = False) -> None:
        for name in names:
            value = getattr(self.settings, name)
            self.must((optional and value is None) or isinstance(value, bool), name, "true or false")

    def add(self, ok: bool, message: str) -> None:
        """A rule between settings; ``message`` names them with ``said``."""
        if not ok:
            self.found.append(message)


S = TypeVar("S", bound="Settings")


class Settings:
    """The one way gptlab's config dataclasses check themselves. A subclass writes
    ``_check(p: Problems)``; ``problems(spell)`` lists every bad setting at once, ``validate(spell)``
    raises them as one ``UserError``, and ``from_dict`` also refuses keys the class does not have."""

    #: what the error calls these settings: "invalid model config: ..."
    WHAT = "settings"

    def _check(self, p: Problems) -> None:
        raise NotImplementedError

    def problems(self, spell: Callable[[str], str] = key) -> list[str]:
        p = Problems(self, spell)
        self._check(p)
        return p.found

    def validate(self: S, spell: Callable[[str], str] = key) -> S:
        found = self.problems(spell)
        if found:
            raise UserError(f"invalid {self.WHAT}: " + "; ".join(found))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any]) -> S:
        """Build and validate from a JSON object; missing keys take defaults, unknown keys are an error."""
        unknown = unknown_keys(d, cls, cls.WHAT)
        if unknown:
            raise UserError(unknown[0])
        return cls(**d).validate()


def unknown_keys(given: Iterable[str], cls: type, where: str) -> list[str]:
    """The problem of keys in ``given`` that dataclass ``cls`` has no field for (one message, or none)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(valid))
    return [f"{where}: unknown key(s) {names(unknown)}; valid keys: {', '.join(valid)}"] if unknown else []
