"""Flags, their MESHLET_ environment variables, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from control_plane.cli import parse_config
from control_plane.config import ControlPlaneConfig

PROG = "meshlet control-plane"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "STORE", "ADMIN_TOKEN", "HEARTBEAT_TTL", "REMOVE_AFTER"):
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
