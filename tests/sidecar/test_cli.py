"""``meshlet sidecar`` flags for secrets, TLS and the metrics listener, parsed in-process
(the one-line exit-2 errors of a real process are in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from sidecar.cli import parse_config
from sidecar.config import Listen

BASE = ["--service", "web"]
HTTPS = ["--control-plane", "https://cp.example:7070"]
PROG = "meshlet sidecar"


@pytest.fixture(autouse=True)
def no_meshlet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags, not whatever the developer's shell exports."""
    import os

    for name in list(os.environ):
        if name.startswith("MESHLET_"):
            monkeypatch.delenv(name)


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """stderr's lines of a refused start; it must exit 2."""
    with pytest.raises(SystemExit) as exited:
        parse_config(argv, PROG)
    assert exited.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_config(BASE, PROG)
    assert (config.token, config.admin_token, config.ca_file) == ("", "", "")
    assert config.metrics_listen == Listen("127.0.0.1", 15020)
    assert config.admin == Listen("127.0.0.1", 15000)
    assert capsys.readouterr().err == ""


def test_token_file_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "token"
    secret.write_text("svc-token-1\n")
    assert parse_config([*BASE, "--token-file", str(secret)], PROG).token == "svc-token-1"
    monkeypatch.setenv("MESHLET_TOKEN_FILE", str(secret))
    assert parse_config(BASE, PROG).token == "svc-token-1"
    monkeypatch.delenv("MESHLET_TOKEN_FILE")
    monkeypatch.setenv("MESHLET_TOKEN", "from-env")
    assert parse_config(BASE, PROG).token == "from-env"
    assert capsys.readouterr().err == ""  # no warning: nothing on the command line


def test_a_token_on_the_command_line_works_with_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_config([*BASE, "--token", "svc-token-1"], PROG).token == "svc-token-1"
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"{PROG}: warning: --token on the command line is visible")
    assert "--token-file" in warning
    assert "svc-token-1" not in warning


def test_join_token_is_the_old_name_of_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "join"
    secret.write_text("mesh-join")
    assert parse_config([*BASE, "--join-token-file", str(secret)], PROG).token == "mesh-join"
    monkeypatch.setenv("MESHLET_JOIN_TOKEN", "mesh-join-2")
    assert parse_config(BASE, PROG).token == "mesh-join-2"


def test_token_and_join_token_together_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = refused([*BASE, "--token", "a", "--join-token", "b"], capsys)
    assert lines[-1] == (
        f"{PROG}: error: --token and --join-token: give one (--join-token is the old name)"
    )
    (tmp_path / "a").write_text("a")
    monkeypatch.setenv("MESHLET_JOIN_TOKEN", "b")
    lines = refused([*BASE, "--token-file", str(tmp_path / "a")], capsys)
    assert len(lines) == 1
    assert "--token and --join-token" in lines[0]


def test_admin_token_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("s3cret-admin\n")
    config = parse_config([*BASE, "--admin-token-file", str(tmp_path / "admin")], PROG)
    assert config.admin_token == "s3cret-admin"
    assert config.token == ""  # two different secrets


def test_metrics_listen(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_config([*BASE, "--metrics-listen", "0.0.0.0:9102"], PROG).metrics_listen == (
        Listen("0.0.0.0", 9102)
    )
    monkeypatch.setenv("MESHLET_METRICS_LISTEN", "[::]:15020")
    assert parse_config(BASE, PROG).metrics_listen == Listen("::", 15020)
    (line,) = refused([*BASE, "--metrics-listen", "15020"], capsys)
    assert "--metrics-listen: '15020' is not HOST:PORT" in line


def test_ca_file_must_hold_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    assert parse_config([*BASE, *HTTPS, "--ca-file", str(ca)], PROG).ca_file == str(ca)
    (line,) = refused([*BASE, *HTTPS, "--ca-file", str(tmp_path / "missing.pem")], capsys)
    assert line == (
        f"{PROG}: error: --ca-file: {tmp_path / 'missing.pem'}: No such file or directory"
    )
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (line,) = refused([*BASE, *HTTPS, "--ca-file", str(tmp_path / "junk.pem")], capsys)
    assert line.startswith(f"{PROG}: error: --ca-file: {tmp_path / 'junk.pem'}: no PEM")
    (line,) = refused([*BASE, *HTTPS, "--ca-file", str(tmp_path)], capsys)
    assert line.endswith("Is a directory")


def test_ca_file_needs_an_https_control_plane(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    argv = [*BASE, "--control-plane", "http://cp:7070", "--ca-file", str(ca)]
    (line,) = refused(argv, capsys)
    assert line == f"{PROG}: error: --ca-file: verifies an https:// --control-plane; there is none"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--outbound-policy", "deny_all"], "argument --outbound-policy: invalid choice"),
        (["--opaque-ports", "5432,pg"], "argument --opaque-ports: 'pg' is not a port (1-65535)"),
        (["--opaque-ports", "0"], "argument --opaque-ports: '0' is not a port (1-65535)"),
        (["--cluster-domain", "bad domain"], "--cluster-domain: must be a DNS name"),
        (["--cluster-domain", ""], "--cluster-domain: must be a DNS name"),
        (["--namespace", "Shop_1"], "--namespace: must be a DNS label"),
    ],
)
def test_interception_flags_refuse_what_is_not_usable(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (line,) = refused([*BASE, *argv], capsys)[-1:]
    assert says in line


def test_interception_flags_read_what_they_are_given() -> None:
    config = parse_config(
        [*BASE, "--outbound-policy", "registry_only", "--opaque-ports", "5432, 6379",
         "--cluster-domain", "k8s.internal", "--namespace", "shop"],
        PROG,
    )  # fmt: skip
    assert (config.outbound_policy, config.opaque_ports) == ("registry_only", (5432, 6379))
    assert (config.cluster_domain, config.namespace) == ("k8s.internal", "shop")


def test_control_plane_takes_a_list_from_the_flag_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    mixed = "http://cp-0:7070, https://cp-1.example:7070"
    config = parse_config([*BASE, "--control-plane", mixed, "--ca-file", str(ca)], PROG)
    assert config.control_planes == ("http://cp-0:7070", "https://cp-1.example:7070")
    monkeypatch.setenv("MESHLET_CONTROL_PLANE", "http://a:1,http://b:1")
    assert parse_config(BASE, PROG).control_planes == ("http://a:1", "http://b:1")


def test_a_bad_control_plane_in_a_list_is_named_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (line,) = refused([*BASE, "--control-plane", "http://cp-0:7070,cp-1:7070"], capsys)
    assert line == (
        f"{PROG}: error: --control-plane: URL 2 of 2, 'cp-1:7070', is not http://HOST:PORT "
        "or https://HOST:PORT"
    )


def test_mtls_is_on_by_default_and_off_by_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_config(BASE, PROG).mtls == "on"
    assert parse_config([*BASE, "--mtls", "off"], PROG).mtls == "off"
    monkeypatch.setenv("MESHLET_MTLS", "off")
    assert parse_config(BASE, PROG).mtls == "off"
    monkeypatch.setenv("MESHLET_MTLS", "strict")
    (line,) = refused(BASE, capsys)[-1:]
    assert line == f"{PROG}: error: MESHLET_MTLS='strict': must be one of on, off"


def test_app_protocol_is_http1_by_default_and_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_config(BASE, PROG).app_protocol == "http1"
    assert parse_config([*BASE, "--app-protocol", "http2"], PROG).app_protocol == "http2"
    monkeypatch.setenv("MESHLET_APP_PROTOCOL", "auto")
    assert parse_config(BASE, PROG).app_protocol == "auto"
    monkeypatch.setenv("MESHLET_APP_PROTOCOL", "h2")
    (line,) = refused(BASE, capsys)[-1:]
    assert line == f"{PROG}: error: MESHLET_APP_PROTOCOL='h2': must be one of http1, http2, auto"
