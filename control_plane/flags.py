"""Start-up of a meshlet process: command-line flags that fall back to ``MESHLET_<FLAG>``
environment variables, and logging.

Standard library only: the sidecar uses it too (with ``wire`` and ``ring``, the only control
plane modules it may import).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class FlagParser(argparse.ArgumentParser):
    """argparse whose flags fall back to ``MESHLET_<FLAG>`` environment variables, and whose
    errors are one line naming the flag, exit code 2."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._env_flags: list[tuple[str, str, Callable[[str], Any], str, Sequence[str]]] = []

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
        return values


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


def number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
