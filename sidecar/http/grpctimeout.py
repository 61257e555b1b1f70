"""gRPC's ``grpc-timeout`` header (the caller's deadline, PROTOCOL-HTTP2.md): read as a
deadline in milliseconds, and written again with the time left.

``TimeoutValue TimeoutUnit``: 1 to 8 ASCII digits, then one of ``H`` (hours), ``M``
(minutes), ``S`` (seconds), ``m`` (milliseconds), ``u`` (microseconds), ``n`` (nanoseconds).
A value below a millisecond rounds up to one (Envoy's ``Grpc::Common::getGrpcTimeout``); a
malformed one is ignored, as Envoy ignores it (it is then no deadline of the sidecar's, and
goes on as it came, for the server to judge).
"""

from __future__ import annotations

from typing import Final

#: milliseconds per unit, as a (numerator, denominator) pair: exact for every unit
_UNITS: Final = {
    ord("H"): (3_600_000, 1),
    ord("M"): (60_000, 1),
    ord("S"): (1_000, 1),
    ord("m"): (1, 1),
    ord("u"): (1, 1_000),
    ord("n"): (1, 1_000_000),
}
#: the largest TimeoutValue the header may carry (8 digits)
MAX_VALUE: Final = 99_999_999


def parse_ms(value: bytes) -> int | None:
    """The milliseconds a ``grpc-timeout`` value gives (rounded up), or None if malformed."""
    digits = value[:-1]
    unit = _UNITS.get(value[-1]) if value else None
    if unit is None or not (1 <= len(digits) <= 8) or not digits.isdigit():
        return None
    numerator, denominator = unit
    return -(-int(digits) * numerator // denominator)  # (ceiling division)


def format_ms(ms: int) -> bytes:
    """A ``grpc-timeout`` value for ``ms`` milliseconds (at least 0): in milliseconds when
    8 digits hold it, else in whole seconds rounded down (the deadline is not lengthened)."""
    if ms <= MAX_VALUE:
        return b"%dm" % max(ms, 0)
    seconds = ms // 1000
    if seconds <= MAX_VALUE:
        return b"%dS" % seconds
    return b"%dH" % min(ms // 3_600_000, MAX_VALUE)
