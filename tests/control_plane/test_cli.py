"""Flags, their MESHLET_ environment variables, and one-line errors with exit code 2."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from control_plane.ca import Authority
from control_plane.cli import parse_config
from control_plane.config import ControlPlaneConfig
from control_plane.flags import LogBudget, SafeFormatter

PROG = "meshlet control-plane"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "STORE", "ADMIN_TOKEN", "JOIN_TOKEN", "HEARTBEAT_TTL", "REMOVE_AFTER"):
        monkeypatch.delenv(f"MESHLET_{name}", raising=False)
    assert parse_config([], PROG) == ControlPlaneConfig()


def test_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(
        [
            "--listen",
            "[::1]:0",
            "--store",
            "memory",
            "--admin-token",
            "t",
            "--heartbeat-ttl",
            "2.5",
            "--remove-after",
            "5",
            "--protect-percent",
            "100",
            "--log-level",
            "debug",
        ],
        PROG,
    )
    assert config == ControlPlaneConfig(
        host="::1",
        port=0,
        store="memory",
        admin_token="t",
        heartbeat_ttl=2.5,
        remove_after=5,
        protect_percent=100,
        log_level="debug",
    )
    assert config.url == "http://[::1]:0"


def test_environment_fills_what_flags_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLET_STORE", "memory")
    monkeypatch.setenv("MESHLET_HEARTBEAT_TTL", "3")
    monkeypatch.setenv("MESHLET_REMOVE_AFTER", "9")
    config = parse_config(["--remove-after", "6"], PROG)
    assert (config.store, config.heartbeat_ttl, config.remove_after) == ("memory", 3, 6)


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--listen", "7070"], {}, "argument --listen: '7070' is not HOST:PORT"),
        (["--listen", "host:99999"], {}, "is not HOST:PORT"),
        (["--heartbeat-ttl", "soon"], {}, "argument --heartbeat-ttl: 'soon' is not a number"),
        (["--heartbeat-ttl", "0"], {}, "--heartbeat-ttl: must be more than 0 seconds"),
        (["--remove-after", "10"], {}, "--remove-after: must be more than --heartbeat-ttl"),
        (["--protect-percent", "101"], {}, "--protect-percent: must be from 0 to 100"),
        (["--log-level", "loud"], {}, "argument --log-level: invalid choice"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        ([], {"MESHLET_HEARTBEAT_TTL": "x"}, "MESHLET_HEARTBEAT_TTL='x': 'x' is not a number"),
        ([], {"MESHLET_LOG_LEVEL": "loud"}, "MESHLET_LOG_LEVEL='loud': must be one of debug"),
        (["--admin-token", "a", "--admin-token-file", "f"], {}, "give one of them"),
        (["--admin-token-file", "/nonexistent/t"], {}, "--admin-token-file /nonexistent/t: No"),
        (["--admin-token", "has space"], {}, "--admin-token: a token is 1-256 printable"),
        (
            [],
            {"MESHLET_JOIN_TOKEN": "a", "MESHLET_JOIN_TOKEN_FILE": "f"},
            "MESHLET_JOIN_TOKEN and MESHLET_JOIN_TOKEN_FILE",
        ),
        ([], {"MESHLET_ALLOW_LOOPBACK": "maybe"}, "'maybe' is not on or off"),
        (["--tls-cert", "c.pem"], {}, "--tls-cert: --tls-cert and --tls-key go together"),
        (["--max-instances", "0"], {}, "--max-instances: must be at least 1"),
        (
            ["--max-instances", "10", "--max-instances-per-service", "11"],
            {},
            "--max-instances-per-service: must be from 1 to --max-instances",
        ),
        (["--protect-max", "-1"], {}, "--protect-max: must not be negative"),
        (["--lease-ttl", "0.5"], {}, "--lease-ttl: must be from 1 to 300 seconds"),
        (["--lease-ttl", "1e9"], {}, "--lease-ttl: must be from 1 to 300 seconds"),
        (["--cert-ttl", "1"], {}, "--cert-ttl: must be from 5 seconds to 30 days"),
        (["--cert-ttl", "nan"], {}, "--cert-ttl"),
        (["--ca-cert", "c.pem"], {}, "--ca-cert: --ca-cert and --ca-key go together"),
        (["--trust-domain", "Mesh!"], {}, "--trust-domain: must be a trust domain"),
        ([], {"MESHLET_CA_KEY": "k.pem"}, "--ca-cert: --ca-cert and --ca-key go together"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    argv: list[str],
    env: dict[str, str],
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as caught:
        parse_config(argv, PROG)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"{PROG}: error: ")
    assert says in err


def test_tokens_from_files_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("ADMIN_TOKEN", "JOIN_TOKEN", "ADMIN_TOKEN_FILE", "JOIN_TOKEN_FILE"):
        monkeypatch.delenv(f"MESHLET_{name}", raising=False)
    secret = tmp_path / "admin"
    secret.write_text("from-a-file\n")
    monkeypatch.setenv("MESHLET_JOIN_TOKEN", "from-env")
    config = parse_config(["--admin-token-file", str(secret)], PROG)
    assert (config.admin_token, config.join_token) == ("from-a-file", "from-env")
    assert capsys.readouterr().err == ""  # nothing on the command line: no warning
    monkeypatch.setenv("MESHLET_JOIN_TOKEN_FILE", str(secret))
    monkeypatch.delenv("MESHLET_JOIN_TOKEN")
    assert parse_config([], PROG).join_token == "from-a-file"


def test_a_token_on_the_command_line_draws_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_config(["--admin-token", "t0k"], PROG).admin_token == "t0k"
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: warning: --admin-token on the command line is visible")
    assert "t0k" not in err


def test_allow_loopback_is_a_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLET_ALLOW_LOOPBACK", raising=False)
    assert parse_config([], PROG).allow_loopback is False
    assert parse_config(["--allow-loopback"], PROG).allow_loopback is True
    monkeypatch.setenv("MESHLET_ALLOW_LOOPBACK", "true")
    assert parse_config([], PROG).allow_loopback is True


def test_log_lines_escape_what_clients_put_in_them() -> None:
    formatter = SafeFormatter("%(levelname)s %(message)s")
    hostile = "x\n2026-11-29T00:00:00 ERROR meshlet.api: FORGED\x00\x1b[2J\u2028end"
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "got %s", (hostile,), None)
    line = formatter.format(record)
    assert "\n" not in line
    assert "\x00" not in line
    assert "\x1b" not in line
    assert line == (
        "WARNING got x\\n2026-11-29T00:00:00 ERROR meshlet.api: FORGED\\x00\\x1b[2J\\u2028end"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "bug", (), sys.exc_info())
    assert formatter.format(record).count("\n") >= 2  # a traceback keeps its lines


def test_a_log_budget_lets_a_few_lines_through_and_counts_the_rest() -> None:
    now = [0.0]
    budget = LogBudget(lines=2, window=10.0, now=lambda: now[0])
    assert [budget.take() for _ in range(5)] == ["", "", None, None, None]
    now[0] = 10.0
    assert budget.take() == " (and 3 more like it not logged)"
    assert budget.take() == ""
    assert budget.take() is None


def _pem_files(tmp_path: Path, name: str, cert: bytes, key: bytes) -> list[str]:
    (tmp_path / f"{name}.crt").write_bytes(cert)
    (tmp_path / f"{name}.key").write_bytes(key)
    return ["--ca-cert", str(tmp_path / f"{name}.crt"), "--ca-key", str(tmp_path / f"{name}.key")]


def test_a_given_ca_is_checked_at_start_naming_its_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = Authority.create(time.time(), "example.org")
    cert, key = ca.pem()
    _, other_key = Authority.create(time.time()).pem()
    good = _pem_files(tmp_path, "good", cert, key)
    config = parse_config([*good, "--trust-domain", "example.org"], PROG)
    assert (config.ca_cert, config.trust_domain) == (good[1], "example.org")
    monkeypatch.setenv("MESHLET_CA_CERT", good[1])
    monkeypatch.setenv("MESHLET_CA_KEY", good[3])
    assert parse_config([], PROG).ca_key == good[3]
    for argv, says in (
        (_pem_files(tmp_path, "mismatch", cert, other_key), "--ca-key: the CA key does not match"),
        (_pem_files(tmp_path, "junk", b"junk", key), "--ca-cert: the CA certificate is not a PEM"),
        (_pem_files(tmp_path, "nokey", cert, b"junk"), "--ca-key: the CA key is not an unenc"),
        (["--ca-cert", "/nonexistent/ca.crt", "--ca-key", good[3]], "--ca-cert: cannot read"),
    ):
        with pytest.raises(SystemExit) as caught:
            parse_config(argv, PROG)
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert says in err
        assert "PRIVATE KEY" not in err
