"""Start-up of a meshlet process: command-line flags that fall back to ``MESHLET_<FLAG>``
environment variables, and logging.

Standard library only: the sidecar uses it too (with ``wire`` and ``ring``, the only control
plane modules it may import).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class FlagParser(argparse.ArgumentParser):
    """argparse whose flags fall back to ``MESHLET_<FLAG>`` environment variables, and whose
    errors are one line naming the flag, exit code 2."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._env_flags: list[tuple[str, str, Callable[[str], Any], str, Sequence[str]]] = []
        self._secrets: list[str] = []

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def flag(
        self,
        name: str,
        default: str,
        help: str,
        *,
        convert: Callable[[str], Any] = str,
        choices: Sequence[str] = (),
    ) -> None:
        """``--name VALUE``; ``default`` is read like a command-line value."""
        env = "MESHLET_" + name.removeprefix("--").replace("-", "_").upper()
        shown = f"; default {default}" if default else ""
        self.add_argument(
            name,
            type=convert,
            default=None,
            choices=choices or None,
            help=f"{help} (env {env}{shown})",
        )
        self._env_flags.append((name, env, convert, default, choices))

    def switch(self, name: str, help: str) -> None:
        """``--name`` turns it on; else ``MESHLET_NAME`` (1, true, yes, on; or 0, false, no,
        off)."""
        env = "MESHLET_" + name.removeprefix("--").replace("-", "_").upper()
        self.add_argument(
            name, action="store_const", const=True, help=f"{help} (env {env}; default off)"
        )
        self._env_flags.append((name, env, _on_off, "off", ()))

    def secret(self, name: str, help: str) -> None:
        """A secret (a token): ``--name VALUE`` or ``--name-file PATH``, else the environment
        variables ``MESHLET_NAME`` or ``MESHLET_NAME_FILE``; none gives ``""``. A value on the
        command line works but draws a warning: every user of the host sees it in ``ps``."""
        env = "MESHLET_" + name.removeprefix("--").replace("-", "_").upper()
        self.add_argument(
            name, default=None, help=f"{help} (env {env}; visible in ps: prefer {name}-file)"
        )
        self.add_argument(
            f"{name}-file",
            default=None,
            metavar="PATH",
            help=f"file holding the {help} (env {env}_FILE)",
        )
        self._secrets.append(name)

    def field_error(self, field: str, message: str) -> NoReturn:
        """A refused config field (``drain_timeout``), named as its flag (``--drain-timeout``)."""
        self.error(f"--{field.replace('_', '-')}: {message}")

    def parse_flags(self, argv: Sequence[str] | None) -> dict[str, Any]:
        """Flags given, else their environment variables, else their defaults."""
        values = vars(self.parse_args(argv))
        for name, env, convert, default, choices in self._env_flags:
            dest = name.removeprefix("--").replace("-", "_")
            if values[dest] is not None:
                continue
            raw = os.environ.get(env)
            source = f"{env}={raw!r}" if raw is not None else f"default of {name}"
            try:
                values[dest] = convert(default if raw is None else raw)
            except (argparse.ArgumentTypeError, ValueError) as e:
                self.error(f"{source}: {e}")
            if choices and values[dest] not in choices:
                self.error(f"{source}: must be one of {', '.join(choices)}")
        for name in self._secrets:
            values.update(self._resolve_secret(name, values))
        return values

    def _resolve_secret(self, name: str, values: dict[str, Any]) -> dict[str, str]:
        dest = name.removeprefix("--").replace("-", "_")
        env = "MESHLET_" + dest.upper()
        given, path = values.pop(dest), values.pop(dest + "_file")
        on_command_line = given is not None
        if on_command_line and path is not None:
            self.error(f"{name} and {name}-file: give one of them")
        if not on_command_line and path is None:
            given, path = os.environ.get(env) or None, os.environ.get(env + "_FILE") or None
            if given is not None and path is not None:
                self.error(f"{env} and {env}_FILE: set one of them")
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    given = f.read(4096).rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                self.error(f"{name}-file {path}: {reason}")
            if not given:
                self.error(f"{name}-file {path}: the file is empty")
        if given is not None and not _TOKEN.fullmatch(given):
            self.error(f"{name}: a token is 1-256 printable ASCII characters without spaces")
        if on_command_line:
            print(
                f"{self.prog}: warning: {name} on the command line is visible to every user of "
                f"this host (ps); use {name}-file or {env}",
                file=sys.stderr,
            )
        return {dest: given or ""}


#: what a bearer token may hold (RFC 6750's b64token, and then some): no spaces or controls
_TOKEN = re.compile(r"[!-~]{1,256}")


def _on_off(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not on or off (1/0, true/false, yes/no)")


def host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = value.rpartition(":")
    if host.startswith("["):
        if not host.endswith("]"):
            raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT ([IPv6]:PORT)")
        host = host[1:-1]
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def ports(value: str) -> tuple[int, ...]:
    """``80, 443``: TCP ports, comma-separated (empty: none)."""
    found: list[int] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise argparse.ArgumentTypeError(f"{part[:20]!r} is not a port (1-65535)")
        found.append(int(part))
    return tuple(found)


def number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None


def escape(text: str) -> str:
    """``text`` with every character that is not printable (newlines, NUL, ANSI escapes, other
    controls) written as a Python escape: one log record stays one line that says what it got."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class LogBudget:
    """At most ``lines`` log lines per ``window`` seconds for one source of events a client
    drives (a sidecar's junk frames, bad requests); the rest are counted, and the next line let
    through says how many were left out."""

    def __init__(
        self, lines: int = 5, window: float = 10.0, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.lines = lines
        self.window = window
        self._now = now
        self._start = -float("inf")
        self._used = 0
        self.skipped = 0
        """left out since the last line let through"""

    def take(self) -> str | None:
        """None: say nothing; else the suffix for the line (empty, or how many were left
        out)."""
        now = self._now()
        if now - self._start >= self.window:
            self._start, self._used = now, 0
        if self._used >= self.lines:
            self.skipped += 1
            return None
        self._used += 1
        skipped, self.skipped = self.skipped, 0
        return f" (and {skipped} more like it not logged)" if skipped else ""


class _ClientErrors(logging.Filter):
    """aiohttp logs a request it could not parse (a client's mistake: an overlong line, a bad
    header) with a traceback at ERROR: make it one line, within a ``LogBudget``. Its errors
    carry the HTTP status they answer with; only a 4xx is the client's."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = LogBudget()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = getattr(exc, "code", None)
        if not isinstance(status, int) or not 400 <= status < 500:
            return True
        if not logging.getLogger("meshlet").isEnabledFor(logging.INFO):
            return False
        suffix = self.budget.take()
        if suffix is None:
            return False
        message = str(getattr(exc, "message", "") or exc).strip()
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg, record.args = "bad request from %s: %d %s%s", (remote, status, message, suffix)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class SafeFormatter(logging.Formatter):
    """Log lines whose message cannot forge another line or drive a terminal, whatever a
    client put in the strings it carries; a traceback below a message keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("aiohttp.server").addFilter(_ClientErrors())
