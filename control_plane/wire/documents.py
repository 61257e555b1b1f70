"""Documents as frozen dataclasses: each field carries a ``Spec`` (description, unit,
bounds) from which the JSON parser (``parse``) and the JSON Schema (``json_schema``, used by
``/openapi.json``) are both derived, so the spec a user reads is the check the code runs."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from control_plane.wire.checks import WireError, _json_type


@dataclass(frozen=True, slots=True)
class Spec:
    """What a document field means and which values it admits."""

    doc: str
    unit: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str = ""
    #: replaces the generic JSON-to-Python conversion (value, path) -> value
    parse: Callable[[Any, str], Any] | None = None
    #: replaces the generated JSON Schema
    schema: Mapping[str, Any] | None = None


def spec(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a :class:`Spec`."""
    return field(default=default, metadata={"spec": Spec(doc, **kwargs)})


def _spec_of(f: dataclasses.Field[Any]) -> Spec:
    found = f.metadata.get("spec")
    assert isinstance(found, Spec), f"field {f.name} has no spec"
    return found


def check_bounds(doc: Any) -> None:
    """Check every field of a document against its spec (call from ``__post_init__``)."""
    for f in dataclasses.fields(doc):
        s = _spec_of(f)
        value = getattr(doc, f.name)
        if value is None or isinstance(value, bool):
            continue
        if s.choices and value not in s.choices:
            raise WireError(f.name, f"must be one of {', '.join(s.choices)}; got {value!r}")
        if s.pattern and (not isinstance(value, str) or not re.fullmatch(s.pattern, value)):
            raise WireError(f.name, f"{value!r} is not of the form {s.pattern}")
        if isinstance(value, int | float) and not (
            (s.lo is None or value >= s.lo) and (s.hi is None or value <= s.hi)
        ):
            unit = f" {s.unit}" if s.unit else ""
            bounds = (
                f"from {_num(s.lo)} to {_num(s.hi)}"
                if s.hi is not None
                else f"at least {_num(s.lo)}"
            )
            raise WireError(f.name, f"must be {bounds}{unit}; got {str(value)[:40]}")


def _num(x: float | None) -> str:
    if x is None:
        return "any"
    return str(int(x)) if float(x).is_integer() else str(x)


# -- JSON to documents -------------------------------------------------------------------

D = TypeVar("D")


#: set while parsing what a peer of another version may send (stream messages): unknown keys
#: are then skipped instead of refused, so a newer control plane can add fields
_lenient: contextvars.ContextVar[bool] = contextvars.ContextVar("lenient", default=False)


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """Within: unknown keys are ignored (a newer peer's fields), not refused."""
    token = _lenient.set(True)
    try:
        yield
    finally:
        _lenient.reset(token)


def parse(cls: type[D], data: Any, path: str = "") -> D:
    """Build document ``cls`` from decoded JSON, rejecting unknown keys and wrong types.

    Absent keys take their defaults. Errors name the dotted path below ``path``.
    """
    if not isinstance(data, dict):
        raise WireError(path or "(document)", f"must be an object, got {_json_type(data)}")
    assert dataclasses.is_dataclass(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        if not _lenient.get():
            raise WireError(
                _join(path, str(unknown[0])), f"unknown key; allowed keys: {', '.join(known)}"
            )
        data = {k: v for k, v in data.items() if k in known}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise WireError(_join(path, missing[0]), "is required")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known[name]
        s = _spec_of(f)
        where = _join(path, name)
        if value is None and f.default is None:
            kwargs[name] = None  # null is "not given" wherever the default is None
        else:
            kwargs[name] = s.parse(value, where) if s.parse else _convert(hints[name], value, where)
    try:
        return cls(**kwargs)
    except WireError as e:
        raise e.under(path) from None


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    """A document class's field types, worked out once: ``typing.get_type_hints`` evaluates
    every annotation's text again at each call, 60 % of a large table's parse (10,000
    endpoints), and the garbage it makes is left as holes in the heap."""
    return typing.get_type_hints(cls)


def _convert(hint: Any, value: Any, path: str) -> Any:
    hint = _not_none(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return parse(hint, value, path)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise WireError(path, "is too large") from None
        if math.isfinite(number):
            return number
    if hint is str and isinstance(value, str):
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise WireError(path, f"must be {expected.get(hint, hint)}, got {_json_type(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- documents to JSON ---------------------------------------------------------------------


def to_json(doc: Any) -> dict[str, Any]:
    """A document as plain JSON-ready values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    result: dict[str, Any] = plain(dataclasses.asdict(doc))
    return result


def json_schema(cls: type[Any]) -> dict[str, Any]:
    """JSON Schema (2020-12, as OpenAPI 3.1 uses it) for document ``cls``."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        s = _spec_of(f)
        prop = dict(s.schema) if s.schema is not None else _schema_for(_not_none(hints[f.name]), s)
        if f.default is None:
            prop = {"anyOf": [{"type": "null"}, prop]}
        if f.default is dataclasses.MISSING:
            required.append(f.name)
        description = s.doc + (f" ({s.unit})" if s.unit else "")
        prop["description"] = description
        if f.default is not dataclasses.MISSING:
            default = f.default
            prop["default"] = (
                to_json(default) if dataclasses.is_dataclass(default) else _plain(default)
            )
        properties[f.name] = prop
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if required:
        schema["required"] = required
    schema["properties"] = properties
    return schema


def _not_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _schema_for(hint: Any, s: Spec) -> dict[str, Any]:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return json_schema(hint)
    out: dict[str, Any] = {
        bool: {"type": "boolean"},
        int: {"type": "integer"},
        float: {"type": "number"},
        str: {"type": "string"},
    }[hint]
    if s.lo is not None:
        out["minimum"] = s.lo
    if s.hi is not None:
        out["maximum"] = s.hi
    if s.choices:
        out["enum"] = list(s.choices)
    if s.pattern:
        out["pattern"] = f"^(?:{s.pattern})$"
    return out
