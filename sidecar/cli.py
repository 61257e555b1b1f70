"""``meshlet sidecar``: flags (each also read from ``MESHLET_<FLAG>``) to a config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from control_plane.flags import FlagParser, host_port, number, ports
from control_plane.wire import PROTOCOLS
from sidecar import build_error
from sidecar.config import LOG_LEVELS, OPAQUE_PORTS, OUTBOUND_POLICIES, Listen, SidecarConfig
from sidecar.errors import ConfigError
from sidecar.tls import client_context


def listen(value: str) -> Listen:
    return Listen(*host_port(value))


def app_url(value: str) -> Listen:
    """``http://HOST:PORT``: where the application listens."""
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"{value!r} is not http://HOST:PORT")
    return Listen(parts.hostname, port)


def build_parser(prog: str) -> FlagParser:
    p = FlagParser(prog=prog, description="Run a meshlet sidecar beside one service.")
    p.flag("--service", "", "name of the service this sidecar stands beside (required)")
    p.flag("--app", "http://127.0.0.1:8080", "the local application", convert=app_url)
    p.flag("--outbound", "127.0.0.1:15001", "listener for the app's outbound calls", convert=listen)
    p.flag("--inbound", "0.0.0.0:15006", "listener for calls to this service", convert=listen)
    p.flag(
        "--admin",
        "127.0.0.1:15000",
        "admin port: /healthz /readyz /metrics /clusters /config_dump /drain",
        convert=listen,
    )
    p.secret("--admin-token", "bearer token the admin port's mutating calls (/drain) need")
    p.flag(
        "--metrics-listen",
        "127.0.0.1:15020",
        "listener for /metrics /healthz /readyz only (Prometheus and probes)",
        convert=listen,
    )
    p.flag("--table", "", "static routing file, YAML or JSON (reloaded on change and SIGHUP)")
    p.flag("--control-plane", "", "control plane URL (http:// or https://); tables come from it")
    p.secret("--token", "bearer token for the control plane's stream")
    p.secret("--join-token", "bearer token for the control plane's stream (old name of --token)")
    p.flag("--ca-file", "", "PEM CA bundle for an https:// control plane (default: the system's)")
    p.flag("--advertise", "", "address callers reach this sidecar at (default: this host's)")
    p.flag(
        "--register",
        "sidecar",
        "register the inbound listener or the app itself",
        choices=("sidecar", "app"),
    )
    p.flag(
        "--app-protocol",
        "http1",
        "how the inbound speaks to the app: http1, http2 (h2c) or auto (the caller's)",
        choices=PROTOCOLS,
    )
    p.flag("--state-dir", ".meshlet", "where the last good table is kept")
    p.flag("--app-health", "/healthz", "path on the app to check, or none")
    p.flag("--app-health-interval", "5", "seconds between app health checks", convert=number)
    p.flag("--zone", "", "this sidecar's locality zone")
    p.flag("--drain-timeout", "20", "seconds in-flight requests get on SIGTERM", convert=number)
    p.flag(
        "--deregister-delay",
        "1",
        "seconds between deregistering and draining on SIGTERM",
        convert=number,
    )
    p.flag("--log-level", "info", "log level", choices=LOG_LEVELS)
    p.flag("--metrics", "on", "Prometheus metrics at /metrics", choices=("on", "off"))
    p.flag("--access-log", "", "JSON lines of every request to this file, or - for stdout")
    p.flag(
        "--max-connections",
        "10000",
        "client connections per listener; more are closed at once",
        convert=count,
    )
    p.flag(
        "--source-share",
        "0.5",
        "inbound: the share of --max-connections and of the app's requests in flight one "
        "source address may hold (0: no limit)",
        convert=number,
    )
    p.flag(
        "--min-data-rate",
        "240",
        "bytes/s a request body, or a client reading its answers, must average (0: off)",
        convert=number,
    )
    p.flag("--data-rate-grace", "5", "seconds before --min-data-rate counts", convert=number)
    p.flag(
        "--outbound-policy",
        "allow_any",
        "requests for hosts the mesh does not know: passed through, or answered 502",
        choices=OUTBOUND_POLICIES,
    )
    p.flag(
        "--opaque-ports",
        ",".join(map(str, OPAQUE_PORTS)),
        "intercepted connections to these ports are relayed as TCP, unparsed",
        convert=ports,
    )
    p.flag(
        "--cluster-domain",
        "cluster.local",
        "Kubernetes' DNS domain: SERVICE.NAMESPACE.svc.<it> names SERVICE",
    )
    p.flag("--namespace", "", "the Kubernetes namespace this instance is registered in")
    p.flag(
        "--mtls",
        "on",
        "mesh TLS with other sidecars, under a certificate the control plane signs",
        choices=("on", "off"),
    )
    return p


def count(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


def parse_config(argv: Sequence[str] | None, prog: str) -> SidecarConfig:
    parser = build_parser(prog)
    values = parser.parse_flags(argv)
    if not values["service"]:
        parser.error("--service: required (or MESHLET_SERVICE)")
    join_token = values.pop("join_token")
    if join_token and values["token"]:
        parser.error("--token and --join-token: give one (--join-token is the old name)")
    values["token"] = values["token"] or join_token
    try:
        config = SidecarConfig(**values)
        if config.ca_file:
            client_context(config.ca_file)  # a bad file stops the start, not each connect
    except ConfigError as e:
        parser.field_error(e.field, e.message)
    return config


def main(argv: Sequence[str] | None = None, prog: str = "meshlet sidecar") -> int:
    refused = build_error()
    if refused:
        print(f"{prog}: error: {refused}", file=sys.stderr)
        return 2
    config = parse_config(argv, prog)
    from sidecar.app import run

    return run(config)
