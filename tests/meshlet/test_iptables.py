"""``meshlet iptables``: the rules it writes, and the flags it refuses, without touching any
table (``--dry-run``). The rules at work in a namespace: tests/integration/test_interception.py."""

from __future__ import annotations

import pytest

from meshlet.iptables import Interception, installed, main


def test_the_default_rules_redirect_all_but_the_sidecar_and_loopback() -> None:
    assert Interception().rules() == [
        "-A PREROUTING -p tcp -j MESHLET_INBOUND",
        "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
        "-A MESHLET_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
        "-A MESHLET_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
        "-A MESHLET_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A MESHLET_INBOUND -p tcp -j MESHLET_IN_REDIRECT",
        "-A MESHLET_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHLET_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A MESHLET_OUTPUT -j MESHLET_REDIRECT",
        "-A MESHLET_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ]


def test_listed_inbound_ports_and_exclusions_become_rules() -> None:
    rules = Interception(
        inbound_ports=(8080,),
        exclude_inbound_ports=(),
        exclude_outbound_ports=(22,),
        exclude_outbound_cidrs=("10.0.0.0/8",),
        proxy_uid=2102,
    ).rules()
    assert "-A MESHLET_INBOUND -p tcp -m tcp --dport 8080 -j MESHLET_IN_REDIRECT" in rules
    assert "-A MESHLET_INBOUND -p tcp -j MESHLET_IN_REDIRECT" not in rules
    assert not any("-j RETURN" in r for r in rules if r.startswith("-A MESHLET_INBOUND"))
    assert rules.index("-A MESHLET_OUTPUT -p tcp -m tcp --dport 22 -j RETURN") < rules.index(
        "-A MESHLET_OUTPUT -j MESHLET_REDIRECT"
    )
    assert "-A MESHLET_OUTPUT -d 10.0.0.0/8 -j RETURN" in rules
    assert "-A MESHLET_OUTPUT -m owner --uid-owner 2102 -j RETURN" in rules


def test_installed_rules_are_read_back_from_iptables_save() -> None:
    save = "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":MESHLET_OUTPUT - [0:0]",
            "-A PREROUTING -p tcp -m tcp --dport 9 -j DNAT --to-destination 1.2.3.4",
            *Interception().rules(),
            "COMMIT",
        ]
    )
    assert installed(save) == Interception().rules()  # others' rules are not ours


def test_dry_run_prints_one_restore_transaction(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--dry-run", "--inbound-ports", "8080, 9090"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("iptables-restore --noflush <<EOF\n*nat\n")
    assert ":MESHLET_REDIRECT - [0:0]" in out
    assert "--dport 9090 -j MESHLET_IN_REDIRECT" in out
    assert out.endswith("COMMIT\nEOF\n")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--inbound-ports", "80,http"], "--inbound-ports: 'http' is not a port (1-65535)"),
        (["--exclude-outbound-ports", "70000"], "--exclude-outbound-ports: '70000' is not a port"),
        (["--outbound-port", "0"], "--outbound-port: 0 is not a port (1-65535)"),
        (["--proxy-uid", "-1"], "--proxy-uid: -1 is not a UID"),
        (
            ["--exclude-outbound-cidrs", "10.0.0.0/8,not-a-net"],
            "--exclude-outbound-cidrs: 'not-a-net' is not an IPv4 address or CIDR",
        ),
        (["--exclude-outbound-cidrs", "fd00::/8"], "'fd00::/8' is IPv6; only IPv4 is intercepted"),
    ],
)
def test_a_bad_flag_is_named_and_nothing_runs(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install", "--dry-run", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert says in captured.err
    assert captured.err.startswith("meshlet iptables: error: ")
    assert captured.err.count("\n") == 1
