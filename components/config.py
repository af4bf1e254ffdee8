"""Typed, frozen stage configs loaded from ``params.yaml``.

Every stage reads one section of ``params.yaml`` into a frozen dataclass. Loading is strict:
an unknown key or a value of the wrong type fails at load time with the key's dotted name
(``sft.peft.r: expected int, got str 'eight'``), so a typo never silently falls back to a
default. Values are range-checked too: a field's annotation may carry constraints
(``Annotated[int, Range(ge=1)]``, :class:`OneOf`, :class:`NonEmpty`, :class:`Pattern`), and a
section class may define ``cross_check()`` for rules that span its fields. :func:`build` reports
every problem at once, one ``<dotted.key>: <problem>`` line each. The section classes live in
:mod:`components.params`; a contract test keeps them, ``params.yaml`` and ``dvc.yaml`` in
agreement.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from components.errors import PosttrainError

T = TypeVar("T")


class ConfigError(PosttrainError):
    """A params file that does not match the typed configs; the message names the dotted key.

    One error may carry several problems: ``problems`` holds them, one ``<dotted.key>: <problem>``
    line each, and the message is those lines joined (so its first line names the first key).
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


# --------------------------------------------------------------------------- constraints


class Constraint:
    """A check on one already type-checked value, declared in its annotation (``Annotated[T, c]``)."""

    def problem(self, value: Any) -> str | None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


def _num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Range(Constraint):
    """Bounds on a number: ``Range(ge=0)``, ``Range(gt=0)``, ``Range(ge=0, lt=1)``; floats must be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        low = (
            f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        )
        high = (
            f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        )
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {low[1:]}" if self.ge is not None else f"> {low[1:]}"
        return f"<= {high[:-1]}" if self.le is not None else f"< {high[:-1]}"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self.describe()}, got {value!r}"


@dataclass(frozen=True)
class OneOf(Constraint):
    """A value from a list kept elsewhere (a ``Literal`` would have to repeat it)."""

    values: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else f"expected one of {list(self.values)}, got {value!r}"


@dataclass(frozen=True)
class NonEmpty(Constraint):
    """A string that is not blank, or a list with at least one item."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str):
            return f"must not be empty, got {value!r}" if not value.strip() else None
        return "must not be empty" if len(value) == 0 else None


@dataclass(frozen=True)
class Pattern(Constraint):
    """A string that matches ``regex`` in full; ``description`` says what that means in words."""

    regex: str
    description: str

    def problem(self, value: Any) -> str | None:
        return None if re.fullmatch(self.regex, value) else f"must be {self.description}, got {value!r}"


# --------------------------------------------------------------------------- loading


class _Invalid:
    """The result of coercing a value that had a problem (already recorded)."""


_INVALID: Any = _Invalid()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str], base: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type.

    Only lossless conversions are made: an int where a float is expected, a YAML list where a
    tuple is expected, a mapping where a nested dataclass is expected. A problem is appended to
    ``problems`` (``<key>: <problem>``) and the result is ``_INVALID``; constraints in an
    ``Annotated`` annotation are checked once the value has the right type. ``base``: the
    enclosing field's default for a nested dataclass (keys the mapping leaves out come from it).
    """
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *extras = typing.get_args(tp)
        value = _coerce(value, inner, key, problems, base)
        if value is _INVALID:
            return _INVALID
        found = [p for c in extras if isinstance(c, Constraint) and (p := c.problem(value)) is not None]
        problems.extend(f"{key}: {p}" for p in found)
        return _INVALID if found else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            problems.append(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
            return _INVALID
        return _build(tp, value, key, problems, base)  # type: ignore[arg-type]
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            problems.append(f"{key}: expected one of {list(allowed)}, got {value!r}")
            return _INVALID
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        attempts: list[list[str]] = []
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, key, trial)
            if not trial:
                return out
            attempts.append(trial)
        problems.extend(attempts[0] if len(attempts) == 1 else [f"{key}: {value!r} matches none of {tp}"])
        return _INVALID
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return _INVALID
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else tuple(items)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected float, got {type(value).__name__} {value!r}")
            return _INVALID
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected int, got {type(value).__name__} {value!r}")
            return _INVALID
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            problems.append(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
            return _INVALID
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")  # a bug in a config class


def _build(
    cls: type[T], data: Mapping[str, Any] | None, prefix: str, problems: list[str], base: Any = None
) -> Any:
    """``cls`` from ``data``, or ``_INVALID`` after appending each problem (in file order) to ``problems``.

    Keys ``data`` leaves out keep ``base``'s values when given (a nested field whose default differs
    from its class's, e.g. ``reward_model.peft.method: full``), else the class defaults. A class may
    name, in ``MISPLACED_KEYS``, the sub-blocks a stray key belongs in, so the error says where to move it.

    Cross-field rules (the class's ``cross_check()``, yielding ``(field, problem)`` pairs) run only
    when every field on its own is valid, so they can rely on each field's own range.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    nested_defaults = {
        f.name: f.default_factory()
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default_factory is not dataclasses.MISSING
    }
    misplaced: Mapping[str, tuple[str, ...]] = getattr(cls, "MISPLACED_KEYS", {})
    before = len(problems)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in names:
            kwargs[name] = _coerce(
                value, hints[name], f"{prefix}.{name}", problems, nested_defaults.get(name)
            )
        elif name in misplaced:
            parent = prefix.rsplit(".", 1)[0]  # "../x": a sibling block of this one
            where = " or ".join(
                f"{parent}.{g[3:]}.{name}" if g.startswith("../") else f"{prefix}.{g}.{name}"
                for g in misplaced[name]
            )
            problems.append(f"{prefix}.{name}: unknown key here; this knob belongs in {where}")
        else:
            problems.append(f"{prefix}.{name}: unknown key (allowed: {', '.join(sorted(names))})")
    if len(problems) > before:
        return _INVALID
    try:
        cfg = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as exc:  # a guard in the class's own __post_init__
        problems.extend(exc.problems)
        return _INVALID
    cross_check = getattr(cfg, "cross_check", None)
    found = [f"{prefix}.{name}: {problem}" for name, problem in cross_check()] if cross_check else []
    problems.extend(found)
    return _INVALID if found else cfg


def collect(cls: type[T], data: Mapping[str, Any] | None, prefix: str, problems: list[str]) -> T | None:
    """Like :func:`build`, but append the problems to ``problems`` and return ``None`` if there are any."""
    cfg = _build(cls, data, prefix, problems)
    return None if cfg is _INVALID else cfg


def build(cls: type[T], data: Mapping[str, Any] | None, prefix: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``; every error names ``prefix.key``.

    All problems are found before raising: one :class:`ConfigError` lists them, one line each.
    """
    problems: list[str] = []
    cfg = _build(cls, data, prefix, problems)
    if problems:
        raise ConfigError(*problems)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-YAML form of a config (tuples become lists), as written to ``config.yaml``."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the form MLflow params and DVC params keys use."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


class ParamsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``3e-3``, ``1E-4`` and ``1.0e5`` as floats (as YAML 1.2 does).

    PyYAML follows YAML 1.1, whose float pattern needs a dot and a signed exponent, so those
    spellings would load as strings. Everything else resolves exactly as with ``yaml.safe_load``.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    """Read a params file; a missing file or a YAML error is one clear line. ``3e-3`` is a float."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        data = yaml.load(path.read_text(), Loader=ParamsLoader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data
