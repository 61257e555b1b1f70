"""``meshlet iptables install|uninstall|show``: the nat rules that send a pod's TCP through its
sidecar without the app knowing (Istio's ``istio-iptables``, Linkerd's ``proxy-init``).

Run in the pod's network namespace, as root or with ``NET_ADMIN`` (an init container):

- outbound: TCP the pod opens (``OUTPUT``) goes to the sidecar's outbound listener
  (``--outbound-port``, 15001), except the sidecar's own (``--proxy-uid``: the image's fixed
  UID), loopback (the app to its sidecar, the sidecar to its app), and the ports and CIDRs
  excluded;
- inbound: TCP arriving for the pod (``PREROUTING``) goes to the inbound listener
  (``--inbound-port``, 15006), for every port or those of ``--inbound-ports``, except the
  sidecar's own ports (``--exclude-inbound-ports``, by default its metrics and probe port, so
  that kubelet and Prometheus reach it directly).

The rules live in four chains of their own (``MESHLET_*``), jumped to from ``PREROUTING`` and
``OUTPUT``. ``install`` is idempotent: rules already as asked change nothing, other
``MESHLET_*`` rules are replaced. ``uninstall`` removes the chains and jumps (none: nothing
to do). ``--dry-run`` prints what would be run and runs nothing. IPv4 only (``iptables``; the
``ip6tables`` twin is not written yet).
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from control_plane.flags import ports

#: the sidecar's UID in the image (``deploy/Dockerfile``): its own traffic is never redirected
DEFAULT_PROXY_UID = 1337
#: the sidecar's ports a pod's peers reach directly: metrics and probes (15020), and the
#: listeners themselves
DEFAULT_EXCLUDE_INBOUND = (15001, 15006, 15020)

INBOUND, IN_REDIRECT, OUTPUT, REDIRECT = (
    "MESHLET_INBOUND",
    "MESHLET_IN_REDIRECT",
    "MESHLET_OUTPUT",
    "MESHLET_REDIRECT",
)
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
#: the jumps into the chains, from the built-in ones: (built-in chain, rule)
JUMPS = (("PREROUTING", f"-p tcp -j {INBOUND}"), ("OUTPUT", f"-p tcp -j {OUTPUT}"))


class UsageError(Exception):
    """A flag's value is not usable: the message names it."""


@dataclass(frozen=True)
class Interception:
    """What ``install`` redirects, and what it leaves alone."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    proxy_uid: int = DEFAULT_PROXY_UID
    inbound_ports: tuple[int, ...] = ()
    """only these destination ports are redirected inbound (empty: all)"""
    exclude_inbound_ports: tuple[int, ...] = DEFAULT_EXCLUDE_INBOUND
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()

    def rules(self) -> list[str]:
        """The chains' rules, as ``iptables-save`` prints them (``-A CHAIN ...``)."""
        out = [f"-A {builtin} {rule}" for builtin, rule in JUMPS]
        out += [
            f"-A {INBOUND} -p tcp -m tcp --dport {p} -j RETURN" for p in self.exclude_inbound_ports
        ]
        if self.inbound_ports:
            out += [
                f"-A {INBOUND} -p tcp -m tcp --dport {p} -j {IN_REDIRECT}"
                for p in self.inbound_ports
            ]
        else:
            out.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
        out.append(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {self.inbound_port}")
        out.append(f"-A {OUTPUT} -m owner --uid-owner {self.proxy_uid} -j RETURN")
        out.append(f"-A {OUTPUT} -d 127.0.0.1/32 -j RETURN")
        out += [
            f"-A {OUTPUT} -p tcp -m tcp --dport {p} -j RETURN" for p in self.exclude_outbound_ports
        ]
        out += [f"-A {OUTPUT} -d {cidr} -j RETURN" for cidr in self.exclude_outbound_cidrs]
        out.append(f"-A {OUTPUT} -j {REDIRECT}")
        out.append(f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {self.outbound_port}")
        return out

    def restore_script(self) -> str:
        """Input for ``iptables-restore --noflush``: creates (or empties) the chains and
        writes the rules, in one transaction."""
        lines = ["*nat", *(f":{chain} - [0:0]" for chain in CHAINS), *self.rules(), "COMMIT"]
        return "\n".join(lines) + "\n"


def installed(save: str) -> list[str]:
    """The meshlet rules in ``iptables-save -t nat`` output, in its order."""
    return [
        line
        for line in save.splitlines()
        if line.startswith("-A ") and any(chain in line.split() for chain in CHAINS)
    ]


def _ports(flag: str, text: str) -> tuple[int, ...]:
    try:
        return ports(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{flag}: {e}") from None


def _cidrs(flag: str, text: str) -> tuple[str, ...]:
    cidrs: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise UsageError(f"{flag}: {part[:50]!r} is not an IPv4 address or CIDR") from None
        if net.version != 4:
            raise UsageError(f"{flag}: {part[:50]!r} is IPv6; only IPv4 is intercepted")
        cidrs.append(str(net))
    return tuple(cidrs)


def _port(flag: str, value: int) -> int:
    if not 0 < value < 65536:
        raise UsageError(f"{flag}: {value} is not a port (1-65535)")
    return value


def interception(args: argparse.Namespace) -> Interception:
    """The flags, checked: UsageError names the first one that is not usable."""
    if args.proxy_uid < 0:
        raise UsageError(f"--proxy-uid: {args.proxy_uid} is not a UID")
    return Interception(
        outbound_port=_port("--outbound-port", args.outbound_port),
        inbound_port=_port("--inbound-port", args.inbound_port),
        proxy_uid=args.proxy_uid,
        inbound_ports=_ports("--inbound-ports", args.inbound_ports),
        exclude_inbound_ports=_ports("--exclude-inbound-ports", args.exclude_inbound_ports),
        exclude_outbound_ports=_ports("--exclude-outbound-ports", args.exclude_outbound_ports),
        exclude_outbound_cidrs=_cidrs("--exclude-outbound-cidrs", args.exclude_outbound_cidrs),
    )


class Iptables:
    """The ``nat`` table through the iptables commands (or, dry, what would be run)."""

    def __init__(self, *, dry_run: bool = False) -> None:
        self.dry_run = dry_run
        missing = [
            c for c in ("iptables", "iptables-save", "iptables-restore") if not shutil.which(c)
        ]
        if missing and not dry_run:
            raise UsageError(f"{', '.join(missing)} not found: install iptables")

    def save(self) -> str:
        return self._run("iptables-save", "-t", "nat", reads=True)

    def _run(self, *argv: str, stdin: str | None = None, reads: bool = False) -> str:
        if self.dry_run and not reads:
            print(" ".join(argv) + (f" <<EOF\n{stdin}EOF" if stdin else ""))
            return ""
        if self.dry_run:
            return ""  # (nothing installed, as far as a dry run knows)
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or 'failed'}")
        return done.stdout

    def install(self, want: Interception) -> bool:
        """Write the rules; False when they were already as asked (nothing changed)."""
        if installed(self.save()) == want.rules():
            return False
        self.uninstall()
        self._run("iptables-restore", "--noflush", stdin=want.restore_script())
        return True

    def uninstall(self) -> bool:
        """Remove the jumps and chains; False when there were none."""
        save = self.save()
        rules = installed(save)
        chains = [chain for chain in CHAINS if f":{chain} " in save]
        for builtin, rule in JUMPS:
            for _ in range(rules.count(f"-A {builtin} {rule}")):
                self._run("iptables", "-t", "nat", "-D", builtin, *rule.split())
        for chain in chains:
            self._run("iptables", "-t", "nat", "-F", chain)
        for chain in chains:
            self._run("iptables", "-t", "nat", "-X", chain)
        return bool(rules or chains)


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write, remove or show the nat rules that send a pod's TCP through its "
        "sidecar (run in the pod's network namespace, with NET_ADMIN).",
    )
    p.add_argument("action", choices=("install", "uninstall", "show"))
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("--outbound-port", type=int, default=15001)
    p.add_argument("--inbound-port", type=int, default=15006)
    p.add_argument(
        "--proxy-uid",
        type=int,
        default=DEFAULT_PROXY_UID,
        help=f"the sidecar's UID: its traffic is left alone (default {DEFAULT_PROXY_UID})",
    )
    p.add_argument(
        "--inbound-ports", default="", help="comma-separated ports to redirect inbound (all)"
    )
    p.add_argument(
        "--exclude-inbound-ports",
        default=",".join(map(str, DEFAULT_EXCLUDE_INBOUND)),
        help="ports reached directly (default: the sidecar's own, %(default)s)",
    )
    p.add_argument("--exclude-outbound-ports", default="", help="comma-separated ports")
    p.add_argument("--exclude-outbound-cidrs", default="", help="comma-separated IPv4 CIDRs")
    return p


def main(argv: Sequence[str], prog: str = "meshlet iptables") -> int:
    args = parser(prog).parse_args(argv)
    try:
        want = interception(args)
        tables = Iptables(dry_run=args.dry_run)
        if args.action == "show":
            rules = installed(tables.save()) if not args.dry_run else want.rules()
            print("\n".join(rules) if rules else "no meshlet rules")
        elif args.action == "install":
            changed = tables.install(want)
            if not args.dry_run:
                print("installed" if changed else "already installed: nothing changed")
        else:
            removed = tables.uninstall()
            if not args.dry_run:
                print("uninstalled" if removed else "no meshlet rules: nothing to do")
    except (UsageError, RuntimeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0
