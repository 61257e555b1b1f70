"""``meshlet ctl``: the operator's view of a control plane, over its REST API.

Each command turns the control plane's JSON into a view (tables and lines of text), and
``emit`` alone decides its form: ``--json`` prints the JSON itself, a terminal gets rich
tables, anything else (pipes, scripts, the README's examples) plain aligned text. A refusal or
an unreachable control plane is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any, TextIO

from control_plane.flags import FlagParser


class CtlError(Exception):
    """One line for the operator."""


class Client:
    def __init__(self, base: str, token: str, ca_file: str = "") -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.tls: ssl.SSLContext | None = None
        if self.base.startswith("https://"):
            try:
                self.tls = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise CtlError(
                    f"--ca-file {ca_file}: {getattr(e, 'strerror', None) or e}"
                ) from None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.tls) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())
                detail = err["error"] + (f" (field {err['field']})" if err.get("field") else "")
            except (ValueError, KeyError, TypeError):
                detail = e.reason
            raise CtlError(f"{method} {path}: {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CtlError(f"control plane at {self.base} is unreachable: {reason}") from None
        return json.loads(raw) if raw else None


@dataclass(frozen=True, slots=True)
class Grid:
    """Rows under a header, with a title line above them if any."""

    header: list[str]
    rows: list[list[str]]
    title: str = ""


#: what a command shows, in order: tables, and lines of text ("" for a blank line)
View = list[Grid | str]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
        for line in lines
    )


def set_key(policy: dict[str, Any], assignment: str) -> None:
    """``retries=2``, ``retry_budget.ratio=0.3``, ``lb=maglev``: JSON values, else strings;
    a key whose value is a list takes a comma list (``allow_from=web,orders``, ``*``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise CtlError(f"--set {assignment!r}: expected KEY=VALUE")
    *parents, last = key.split(".")
    target = policy
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            raise CtlError(f"--set {assignment!r}: {part} is not an object")
        target = child
    try:
        value = json.loads(raw)
    except ValueError:
        is_list = isinstance(target.get(last), list)
        value = [item.strip() for item in raw.split(",") if item.strip()] if is_list else raw
    target[last] = value


def run(args: argparse.Namespace, client: Client) -> tuple[Any, View]:
    """(the JSON answer, the same for a person)."""
    if args.command == "services":
        data = client.call("GET", "/v1/services")
        rows = [
            [
                s["name"],
                s["lb"],
                *(str(s["instances"][k]) for k in ("healthy", "unhealthy", "draining", "total")),
            ]
            for s in data["services"]
        ]
        view: View = [Grid(["SERVICE", "LB", "HEALTHY", "UNHEALTHY", "DRAINING", "TOTAL"], rows)]
        if data["protection"]:
            view.append("PROTECTION ON: too many instances missed heartbeats; none expire")
        return data, view
    if args.command == "instances":
        data = client.call("GET", f"/v1/services/{args.service}/instances")
        rows = [
            [
                i["id"],
                f"{i['address']}:{i['port']}",
                i["zone"] or "-",
                str(i["weight"]),
                i["status"],
                i["last_heartbeat"] or "-",
            ]
            for i in data["instances"]
        ]
        return data, [Grid(["ID", "ADDRESS", "ZONE", "WEIGHT", "STATUS", "LAST HEARTBEAT"], rows)]
    if args.command == "policy":
        data = client.call("GET", f"/v1/services/{args.service}/policy")
        if args.set or args.assignments:
            policy = data["policy"]
            for assignment in [*args.set, *args.assignments]:
                set_key(policy, assignment)
            data = client.call("PUT", f"/v1/services/{args.service}/policy", policy)
        return data, [json.dumps(data["policy"], indent=2)]
    if args.command in ("drain", "undrain", "weight"):
        body: dict[str, Any] = (
            {"weight": args.weight}
            if args.command == "weight"
            else {"status": "draining" if args.command == "drain" else "healthy"}
        )
        data = client.call("PATCH", f"/v1/services/{args.service}/instances/{args.id}", body)
        return data, [f"{data['service']}/{data['id']}: {data['status']}, weight {data['weight']}"]
    if args.command == "ring":
        key = urllib.parse.quote(args.key, safe="")
        data = client.call("GET", f"/v1/services/{args.service}/ring?key={key}")
        return data, [
            f"{data['key']} -> {data['instance']} ({data['algorithm']}, table v{data['version']})"
        ]
    if args.command == "sidecars":
        data = client.call("GET", "/v1/sidecars")
        return data, sidecars_view(data["sidecars"])
    if args.command == "table":
        data = client.call("GET", "/v1/table")
        return data, table_view(data)
    if args.command == "token":
        return token(args, client)
    raise AssertionError(args.command)


def token(args: argparse.Namespace, client: Client) -> tuple[Any, View]:
    """``token create SERVICE``, ``token list``, ``token revoke ID``."""
    if args.token_command == "create":
        body = {"service": args.service, "description": args.description}
        data = client.call("POST", "/v1/tokens", body)
        return data, [
            f"token {data['id']} for service {data['service']}:",
            data["secret"],
            "(shown this once: give it to the service's sidecars as --token-file or MESHLET_TOKEN)",
        ]
    if args.token_command == "list":
        data = client.call("GET", "/v1/tokens")
        rows = [
            [t["id"], t["service"], t["description"] or "-", t["created"], t["last_used"] or "-"]
            for t in data["tokens"]
        ]
        if not rows:
            return data, ["no service tokens"]
        return data, [Grid(["ID", "SERVICE", "DESCRIPTION", "CREATED", "LAST USED"], rows)]
    token_id = urllib.parse.quote(args.id, safe="")
    client.call("DELETE", f"/v1/tokens/{token_id}")
    data = {"id": args.id, "revoked": True}
    return data, [f"token {args.id} revoked; the streams it opened are closed"]


def sidecars_view(sidecars: list[dict[str, Any]]) -> View:
    if not sidecars:
        return ["no sidecars connected"]
    rows = [
        [
            s["node"],
            s["service"],
            s["instance"],
            s["token"],
            f"v{s['acked_version']}" if s["acked_version"] else "-",  # 0: none acked yet
            s["last_nack"] or "-",
            s["connected_since"],
        ]
        for s in sidecars
    ]
    header = ["NODE", "SERVICE", "INSTANCE", "TOKEN", "ACKED", "LAST NACK", "CONNECTED SINCE"]
    return [Grid(header, rows)]


def table_view(data: dict[str, Any]) -> View:
    """The table in force: its version, then each service's policy and endpoints."""
    services = data["services"]
    view: View = [
        f"table v{data['version']} (epoch {data['epoch']}): {plural(services, 'service')}"
    ]
    for name, entry in sorted(services.items()):
        endpoints = entry["endpoints"]
        title = f"{name}: {entry['policy']['lb']}, {plural(endpoints, 'endpoint')}"
        rows = [
            [
                f"{e['address']}:{e['port']}",
                e["instance"] or "-",
                str(e["weight"]),
                e["zone"] or "-",
                "yes" if e["draining"] else "no",
            ]
            for e in endpoints
        ]
        view.append("")
        if rows:
            view.append(Grid(["ADDRESS", "INSTANCE", "WEIGHT", "ZONE", "DRAINING"], rows, title))
        else:
            view.append(title)
    return view


def plural(items: Sized, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def emit(data: Any, view: View, as_json: bool, out: TextIO) -> None:
    """The one place output takes its form."""
    if as_json:
        print(json.dumps(data, indent=2), file=out)
    elif out.isatty():
        print_rich(view, out)
    else:
        print(plain(view), file=out)


def plain(view: View) -> str:
    """Aligned text; a titled table's rows are indented under its title."""
    lines: list[str] = []
    for part in view:
        if isinstance(part, str):
            lines.append(part)
        elif part.title:
            lines.append(part.title)
            lines.extend("  " + line for line in table(part.rows, part.header).splitlines())
        else:
            lines.append(table(part.rows, part.header))
    return "\n".join(lines)


def print_rich(view: View, out: TextIO) -> None:
    # Imported here: rich takes tens of milliseconds to load, which --json and pipes skip.
    from rich import box
    from rich.console import Console
    from rich.table import Column, Table
    from rich.text import Text

    console = Console(file=out)
    for part in view:
        # Text, not str: names and NACK reasons come from outside and may look like markup
        if isinstance(part, str):
            console.print(Text(part))
            continue
        # fold, not the default ellipsis: a cut-off instance id is no use to an operator
        columns = (Column(h, overflow="fold") for h in part.header)
        title = part.title or None
        grid = Table(*columns, title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for row in part.rows:
            grid.add_row(*(Text(cell) for cell in row))
        console.print(grid)


def build_parser(prog: str) -> FlagParser:
    p = FlagParser(prog=prog, description="Look at and steer a meshlet control plane.")
    p.flag("--control-plane", "http://127.0.0.1:7070", "control plane URL")
    p.secret("--admin-token", "admin token")
    p.flag("--ca-file", "", "PEM CA bundle to verify an https:// control plane")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    # --json after the command too; SUPPRESS keeps a subcommand from resetting it to False
    common = FlagParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    command("services", "services and their instance counts")
    command("instances", "one service's instances").add_argument("service")
    pol = command("policy", "show a service's policy, or change keys of it")
    pol.add_argument("service")
    pol.add_argument(
        "assignments",
        nargs="*",
        metavar="KEY=VALUE",
        help="keys to change, as with --set (e.g. mtls=strict allow_from=web,orders)",
    )
    pol.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="e.g. retries=2, lb=round_robin, retry_budget.ratio=0.3, allow_from=web,orders",
    )
    for name, help in (("drain", "drain an instance"), ("undrain", "undrain an instance")):
        cmd = command(name, help)
        cmd.add_argument("service")
        cmd.add_argument("id")
    weight = command("weight", "set an instance's weight")
    weight.add_argument("service")
    weight.add_argument("id")
    weight.add_argument("weight", type=int)
    ring = command("ring", "which instance a hash policy sends a key to")
    ring.add_argument("service")
    ring.add_argument("--key", required=True, help="the request's hash key, e.g. a user id")
    command("sidecars", "connected sidecars and the table version each acknowledged")
    command("table", "the routing table in force: each service's policy and endpoints")
    tokens = command("token", "service tokens: create, list, revoke")
    token_sub = tokens.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="mint a token for one service", parents=[common])
    create.add_argument("service")
    create.add_argument("--description", default="", help="what it is for, for people")
    token_sub.add_parser("list", help="every token, with when it was last used", parents=[common])
    token_sub.add_parser("revoke", help="revoke a token", parents=[common]).add_argument("id")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "meshlet ctl") -> int:
    parser = build_parser(prog)
    values = parser.parse_flags(argv)
    args = argparse.Namespace(**values)
    try:
        data, view = run(args, Client(args.control_plane, args.admin_token, args.ca_file))
    except CtlError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    emit(data, view, args.json, sys.stdout)
    return 0
