"""``meshlet SUBCOMMAND ...``: hands the rest of the command line to that subcommand."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from meshlet import __version__


def _control_plane(argv: Sequence[str]) -> int:
    from control_plane.cli import main

    return main(argv, prog="meshlet control-plane")


def _sidecar(argv: Sequence[str]) -> int:
    from sidecar.cli import main

    return main(argv, prog="meshlet sidecar")


def _ctl(argv: Sequence[str]) -> int:
    from meshlet.ctl import main

    return main(argv, prog="meshlet ctl")


def _iptables(argv: Sequence[str]) -> int:
    from meshlet.iptables import main

    return main(argv)


def _wait_ready(argv: Sequence[str]) -> int:
    from meshlet.waitready import main

    return main(argv)


def _inject(argv: Sequence[str]) -> int:
    from meshlet.inject import main

    return main(argv)


def _demo(argv: Sequence[str]) -> int:
    from meshlet.demo import main

    return main(argv)


SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "control-plane": (_control_plane, "run the control plane (registry and REST admin API)"),
    "sidecar": (_sidecar, "run a sidecar proxy beside one service"),
    "ctl": (_ctl, "look at and steer a control plane (services, instances, policy, drain)"),
    "iptables": (_iptables, "write, remove or show a pod's interception rules (NET_ADMIN)"),
    "wait-ready": (_wait_ready, "wait until the sidecar beside this app is ready (/readyz)"),
    "inject": (_inject, "add the sidecar to the workloads in Kubernetes YAML (or take it out)"),
    "demo": (_demo, "run a local mesh with sample services and show what it does"),
}

USAGE = "usage: meshlet {" + ",".join(SUBCOMMANDS) + "} [--help] ..."


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, "", "An asyncio service mesh for Python shops.", "", "subcommands:", sep="\n")
        for name, (_, help) in SUBCOMMANDS.items():
            print(f"  {name:<15} {help}")
        return 0 if args else 2
    if args[0] == "--version":
        import sidecar

        print(f"meshlet {__version__} ({sidecar.__build__})")
        return 0
    command = SUBCOMMANDS.get(args[0])
    if command is None:
        print(
            f"meshlet: error: unknown subcommand {args[0]!r}; one of {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return 2
    return command[0](args[1:])
