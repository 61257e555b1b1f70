"""``meshlet control-plane``: flags (each also read from ``MESHLET_<FLAG>``) to a config."""

from __future__ import annotations

import time
from collections.abc import Sequence

from control_plane.config import LOG_LEVELS, ControlPlaneConfig
from control_plane.errors import ConfigError
from control_plane.flags import FlagParser, host_port, number
from control_plane.trust import load_given


def build_parser(prog: str) -> FlagParser:
    p = FlagParser(prog=prog, description="Run the meshlet control plane.")
    p.flag(
        "--listen",
        "127.0.0.1:7070",
        "REST API address HOST:PORT (port 0: any free one)",
        convert=host_port,
    )
    p.flag(
        "--store",
        "sqlite:///meshlet.db",
        "sqlite:///PATH, memory, or redis://HOST:PORT/DB (rediss:// for TLS) shared by replicas",
    )
    p.secret("--admin-token", "admin token, which may do everything")
    p.secret("--join-token", "mesh-wide join token, which acts for any service's instances")
    p.flag("--tls-cert", "", "PEM certificate chain: serve HTTPS (REST and stream)")
    p.flag("--tls-key", "", "PEM private key of --tls-cert")
    p.flag("--ca-cert", "", "PEM CA certificate that signs workload certificates (own PKI)")
    p.flag("--ca-key", "", "PEM private key (ECDSA, unencrypted) of --ca-cert")
    p.flag("--trust-domain", "cluster.local", "SPIFFE trust domain of workload identities")
    p.flag(
        "--cert-ttl",
        "86400",
        "seconds a workload certificate lasts (sidecars renew at two thirds)",
        convert=number,
    )
    p.switch("--allow-loopback", "accept loopback instance addresses when not on loopback")
    p.flag("--max-instances", "100000", "instances the registry holds at most", convert=int)
    p.flag(
        "--max-instances-per-service", "10000", "instances one service holds at most", convert=int
    )
    p.flag(
        "--protect-max",
        "900",
        "seconds protection may hold expiry before it resumes at a bounded rate",
        convert=number,
    )
    p.flag("--heartbeat-ttl", "15", "seconds without heartbeat until unhealthy", convert=number)
    p.flag("--remove-after", "30", "seconds without heartbeat until removed", convert=number)
    p.flag(
        "--protect-percent",
        "15",
        "expire nothing while more than this %% of instances lapse at once",
        convert=number,
    )
    p.flag("--debounce-quiet", "0.1", "seconds without changes before a push", convert=number)
    p.flag("--debounce-max", "2", "seconds at most from a change to its push", convert=number)
    p.flag(
        "--lease-ttl",
        "5",
        "replicas on redis: seconds the reaper's lease lasts unless renewed",
        convert=number,
    )
    p.flag("--log-level", "info", "log level", choices=LOG_LEVELS)
    return p


def parse_config(argv: Sequence[str] | None, prog: str) -> ControlPlaneConfig:
    parser = build_parser(prog)
    values = parser.parse_flags(argv)
    host, port = values.pop("listen")
    try:
        config = ControlPlaneConfig(host=host, port=port, **values)
        load_given(config, time.time())  # a bad CA stops the start here, naming its flag
    except ConfigError as e:
        parser.field_error(e.field, e.message)
    return config


def main(argv: Sequence[str] | None = None, prog: str = "meshlet control-plane") -> int:
    config = parse_config(argv, prog)
    from control_plane.app import run

    return run(config)
