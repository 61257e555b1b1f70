"""The Prometheus text exposition format, version 0.0.4: metric families and how they are
written, byte for byte as prometheus-client's ``generate_latest`` writes the same families.

A family is built at scrape time and thrown away: ``counter``, ``gauge`` or ``histogram``
by its name, help and label names; ``add`` a sample per label set. A counter is named without
``_total`` and written with it (HELP, TYPE and samples); a histogram writes a ``_bucket`` per
upper bound (``le``, cumulative, ``+Inf`` last), then ``_count`` and ``_sum``. Labels are
written sorted by name; label values escape backslash, double quote and newline, help text
backslash and newline. A family with no samples still writes its HELP and TYPE.

A scrape of a large table is megabytes of text (a 1,000 services x 10 endpoints table: 6.6 MB,
three quarters of it the per-endpoint state series), so it is written as it is produced:
``chunks`` gives it in pieces of about ``CHUNK`` bytes, and a family too large to hold (one
line per endpoint) takes its samples as ``rows``, produced only when the family is written.
Holding it all at once (the samples, the text, its bytes, the response) left the sidecar's
RSS 15 MB higher after a few scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
CHUNK: Final = 32 * 1024
"""characters of lines in a piece of ``chunks`` (it ends at a line's end)"""

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
    rows: Iterable[tuple[Sequence[str], float]] = ()
    """a counter's or gauge's samples after ``samples``, (label values in ``labels`` order,
    value) each, produced only as the family is written: never all held at once"""

    def add(self, values: Sequence[str], value: float) -> None:
        """A counter's or gauge's sample for one label set (values in ``labels`` order)."""
        self.samples.append(self._sample(values, value))

    def _sample(self, values: Sequence[str], value: float) -> tuple[str, str, float]:
        suffix = "_total" if self.kind == "counter" else ""
        return suffix, _label_set(zip(self.labels, values, strict=True)), value

    def lines(self) -> Iterator[str]:
        """HELP and TYPE, then a line per sample (``samples``, then ``rows``)."""
        name = self.name + "_total" if self.kind == "counter" else self.name
        text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        yield f"# HELP {name} {text}\n# TYPE {name} {self.kind}\n"
        for suffix, labels, value in self.samples:
            yield f"{self.name}{suffix}{labels} {go_float(value)}\n"
        for values, value in self.rows:
            suffix, labels, value = self._sample(values, value)
            yield f"{self.name}{suffix}{labels} {go_float(value)}\n"

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


Rows = Iterable[tuple[Sequence[str], float]]


def counter(
    name: str,
    help: str,
    labels: Sequence[str] = (),
    value: float | None = None,
    rows: Rows = (),
) -> Family:
    """A counter (``name`` without ``_total``); with ``value``, its one unlabelled sample;
    ``rows``: see ``Family.rows``."""
    return _family(name, "counter", help, labels, value, rows)


def gauge(
    name: str,
    help: str,
    labels: Sequence[str] = (),
    value: float | None = None,
    rows: Rows = (),
) -> Family:
    return _family(name, "gauge", help, labels, value, rows)


def histogram(name: str, help: str, labels: Sequence[str] = ()) -> Family:
    return Family(name, "histogram", help, tuple(labels))


def _family(
    name: str, kind: Kind, help: str, labels: Sequence[str], value: float | None, rows: Rows
) -> Family:
    family = Family(name, kind, help, tuple(labels), rows=rows)
    if value is not None:
        family.add((), value)
    return family


def chunks(families: Iterable[Family]) -> Iterator[bytes]:
    """The exposition of ``families``, in the order given, in pieces of a little more than
    ``CHUNK`` bytes (the last one less), each ending at a line's end; a family is produced
    (and its rows read) only once the pieces before it were taken."""
    out: list[str] = []
    size = 0
    for family in families:
        for line in family.lines():
            out.append(line)
            size += len(line)
            if size >= CHUNK:
                yield "".join(out).encode()
                out.clear()
                size = 0
    if out:
        yield "".join(out).encode()


def render(families: Iterable[Family]) -> bytes:
    """The exposition of ``families``, in the order given, whole."""
    return b"".join(chunks(families))


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
