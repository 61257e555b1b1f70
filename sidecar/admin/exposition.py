"""The Prometheus text exposition format, version 0.0.4: metric families and how they are
written, byte for byte as prometheus-client's ``generate_latest`` writes the same families.

A family is built at scrape time and thrown away: ``counter``, ``gauge`` or ``histogram``
by its name, help and label names; ``add`` a sample per label set. A counter is named without
``_total`` and written with it (HELP, TYPE and samples); a histogram writes a ``_bucket`` per
upper bound (``le``, cumulative, ``+Inf`` last), then ``_count`` and ``_sum``. Labels are
written sorted by name; label values escape backslash, double quote and newline, help text
backslash and newline. A family with no samples still writes its HELP and TYPE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(slots=True)
class Family:
    name: str
    """as written, except a counter's, which is written with ``_total``"""
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[str, str, float]] = field(default_factory=list)
    """(name suffix, the written label set ``{...}`` or "", value)"""

    def add(self, values: Sequence[str], value: float) -> None:
        """A counter's or gauge's sample for one label set (values in ``labels`` order)."""
        suffix = "_total" if self.kind == "counter" else ""
        self.samples.append((suffix, _label_set(zip(self.labels, values, strict=True)), value))

    def add_histogram(
        self, values: Sequence[str], buckets: Iterable[tuple[str, float]], total: float
    ) -> None:
        """A histogram's samples for one label set: ``buckets`` are (upper bound as written,
        cumulative count), ``+Inf`` last; ``total`` is the sum of what was observed."""
        assert self.kind == "histogram", self.kind
        pairs = list(zip(self.labels, values, strict=True))
        count = 0.0
        for bound, count in buckets:
            self.samples.append(("_bucket", _label_set([*pairs, ("le", bound)]), count))
        plain = _label_set(pairs)
        self.samples.append(("_count", plain, count))
        self.samples.append(("_sum", plain, total))


def counter(name: str, help: str, labels: Sequence[str] = (), value: float | None = None) -> Family:
    """A counter (``name`` without ``_total``); with ``value``, its one unlabelled sample."""
    return _family(name, "counter", help, labels, value)


def gauge(name: str, help: str, labels: Sequence[str] = (), value: float | None = None) -> Family:
    return _family(name, "gauge", help, labels, value)


def histogram(name: str, help: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, "histogram", help, tuple(labels))


def _family(name: str, kind: Kind, help: str, labels: Sequence[str], value: float | None) -> Family:
    family = Family(name, kind, help, tuple(labels))
    if value is not None:
        family.add((), value)
    return family


def render(families: Iterable[Family]) -> bytes:
    """The exposition of ``families``, in the order given."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.kind == "counter" else family.name
        text = family.help.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {text}\n# TYPE {name} {family.kind}\n")
        out += [
            f"{family.name}{suffix}{labels} {go_float(value)}\n"
            for suffix, labels, value in family.samples
        ]
    return "".join(out).encode()


def go_float(value: float) -> str:
    """A sample value as Prometheus writes floats: ``+Inf``, ``-Inf``, ``NaN``, ``1.0``, and
    an exponent from 1e7 up (where Go switches to one; Python's ``repr`` waits until 1e16)."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_set(pairs: Iterable[tuple[str, str]]) -> str:
    items = sorted(pairs)
    if not items:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in items) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
