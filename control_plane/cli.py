"""``meshlet control-plane``: flags (each also read from ``MESHLET_<FLAG>``) to a config."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from control_plane.config import LOG_LEVELS, ControlPlaneConfig
from control_plane.errors import ConfigError


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
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None


def build_parser(prog: str) -> FlagParser:
    p = FlagParser(prog=prog, description="Run the meshlet control plane.")
    p.flag(
        "--listen",
        "127.0.0.1:7070",
        "REST API address HOST:PORT (port 0: any free one)",
        convert=host_port,
    )
    p.flag("--store", "sqlite:///meshlet.db", "sqlite:///PATH or memory")
    p.flag("--admin-token", "", "bearer token that mutating calls must present")
    p.flag("--heartbeat-ttl", "15", "seconds without heartbeat until unhealthy", convert=number)
    p.flag("--remove-after", "30", "seconds without heartbeat until removed", convert=number)
    p.flag(
        "--protect-percent",
        "15",
        "expire nothing while more than this %% of instances lapse at once",
        convert=number,
    )
    p.flag("--log-level", "info", "log level", choices=LOG_LEVELS)
    return p


def parse_config(argv: Sequence[str] | None, prog: str) -> ControlPlaneConfig:
    parser = build_parser(prog)
    values = parser.parse_flags(argv)
    host, port = values.pop("listen")
    try:
        return ControlPlaneConfig(host=host, port=port, **values)
    except ConfigError as e:
        parser.error(f"--{e.field.replace('_', '-')}: {e.message}")


def main(argv: Sequence[str] | None = None, prog: str = "meshlet control-plane") -> int:
    config = parse_config(argv, prog)
    from control_plane.app import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
