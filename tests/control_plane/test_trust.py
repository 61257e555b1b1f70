"""The mesh's CA in the control plane (issue 15): kept in the store, CSRs signed over the
stream for the stream's own identity, the trust bundle in the table and its admin API."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from control_plane import api as api_module
from control_plane.ca import Authority
from control_plane.clock import FakeClock
from control_plane.store import Store, open_store
from control_plane.store_memory import MemoryStore
from control_plane.trust import Trust
from control_plane.wire import Certificate, Csr, Hello, Registration, Table, decode, parse_table
from control_plane.wire.identity import fingerprint, identity_of, make_csr, spiffe_id
from tests.conftest import ADMIN, Api, MakeApi, new_store
from tests.control_plane.test_access import JOIN, call, mint
from tests.control_plane.test_metrics import scrape
from tests.control_plane.test_publisher import Sidecar, connect, publisher
from tests.control_plane.test_replicas import eventually, replicas


def trust(api: Api) -> Trust:
    return api.app[api_module.TRUST]  # type: ignore[no-any-return]


def shop_hello(service: str = "catalog", *, tls: bool = False, namespace: str = "shop") -> Hello:
    reg = Registration(address="10.0.0.1", port=9001, id="c1", namespace=namespace)
    return Hello("node-1", service, reg, tls=tls)


async def certificate(sidecar: Sidecar, csr: bytes | str) -> Certificate:
    """Send a CSR; the answer, skipping the tables pushed meanwhile."""
    await sidecar.send(Csr(csr if isinstance(csr, str) else csr.decode()))
    async with asyncio.timeout(3):
        while True:
            message = decode((await sidecar.ws.receive()).data)
            if isinstance(message, Certificate):
                return message


async def pushed(sidecar: Sidecar, version: int = 0) -> Table:
    """The first table pushed with the catalog in it, of ``version`` at least."""
    async with asyncio.timeout(3):
        while True:
            message = decode((await sidecar.ws.receive()).data)
            if (
                isinstance(message, Table)
                and "catalog" in message.services
                and message.version >= version
            ):
                return message


@pytest.fixture
async def cp(make_api: MakeApi) -> Api:
    return await make_api(store=MemoryStore(), debounce_quiet=0.05, debounce_max=0.5)


async def test_a_csr_over_the_stream_gets_the_streams_identity_for_a_day(
    make_api: MakeApi, clock: FakeClock
) -> None:
    api = await make_api(store=MemoryStore(), join_token=JOIN, debounce_quiet=0.05)
    _, secret = await mint(api, "catalog")
    sidecar = await connect(api, shop_hello(), token=secret)
    identity = spiffe_id("cluster.local", "shop", "catalog")
    key, csr = make_csr(identity)
    answer = await certificate(sidecar, csr)
    assert answer.error == ""
    (cert,) = x509.load_pem_x509_certificates(answer.chain.encode())  # a root CA: no more
    assert identity_of(cert) == identity
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(trust(api).authority.certificate)
    now = datetime.datetime.fromtimestamp(clock.time(), datetime.UTC)
    assert cert.not_valid_after_utc - now == datetime.timedelta(hours=24)
    # a hello that leaves the namespace out keeps the registered one, and so the identity
    await sidecar.ws.close()
    bare = Registration(address="10.0.0.1", port=9001, id="c1")
    again = await connect(api, Hello("node-1", "catalog", bare), token=secret)
    answer = await certificate(again, csr)
    assert identity_of(x509.load_pem_x509_certificate(answer.chain.encode())) == identity
    samples = await scrape(api)
    assert samples['meshlet_cp_certificates_issued_total{service="catalog"}'] == 2


async def test_a_csr_for_another_identity_garbage_or_too_large_is_refused_on_an_open_stream(
    make_api: MakeApi,
) -> None:
    api = await make_api(store=MemoryStore(), join_token=JOIN, debounce_quiet=0.05)
    _, secret = await mint(api, "catalog")
    sidecar = await connect(api, shop_hello(), token=secret)
    _, payments = make_csr(spiffe_id("cluster.local", "shop", "payments"))
    _, other_ns = make_csr(spiffe_id("cluster.local", "prod", "catalog"))
    refusals = [
        (payments, "may only have spiffe://cluster.local/ns/shop/svc/catalog"),
        (other_ns, "asks for spiffe://cluster.local/ns/prod/svc/catalog"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage", "not a PEM certificate request"),
        (b"x" * 9000, "over 8192 bytes"),
    ]
    for csr, says in refusals:
        answer = await certificate(sidecar, csr)
        assert answer.chain == ""
        assert says in answer.error
    _, mine = make_csr(spiffe_id("cluster.local", "shop", "catalog"))
    assert (await certificate(sidecar, mine)).chain  # the stream is still open and served
    samples = await scrape(api)
    for reason, count in (("identity", 2), ("invalid", 1), ("too_large", 1), ("rate", 0)):
        assert samples[f'meshlet_cp_csr_refused_total{{reason="{reason}"}}'] == count


async def test_more_than_ten_csrs_a_minute_on_a_stream_are_refused(
    cp: Api, clock: FakeClock
) -> None:
    sidecar = await connect(cp, shop_hello(namespace=""))
    _, csr = make_csr(spiffe_id("cluster.local", "default", "catalog"))
    for _ in range(10):
        assert (await certificate(sidecar, csr)).chain
    refused = await certificate(sidecar, csr)
    assert (refused.chain, refused.error) == ("", "more than 10 CSRs in 60s on this stream")
    clock.advance(61)
    assert (await certificate(sidecar, csr)).chain
    assert (await scrape(cp))['meshlet_cp_csr_refused_total{reason="rate"}'] == 1


async def test_the_table_carries_the_bundle_and_which_endpoints_take_tls(
    cp: Api, clock: FakeClock
) -> None:
    sidecar = await connect(cp, shop_hello(tls=True))
    table = await pushed(sidecar)
    assert table.trust_domain == "cluster.local"
    (root,) = table.trust_bundle
    assert x509.load_pem_x509_certificate(root.encode()) == trust(cp).authority.certificate
    (endpoint,) = table.services["catalog"].endpoints
    assert endpoint.tls is True
    # a REST registration (no sidecar said so) has it false
    rest = {"id": "r1", "address": "10.0.0.2", "port": 80}
    assert (await cp.post("/v1/services/catalog/instances", json=rest)).status == 201
    await publisher(cp).rebuild()
    async with cp.get("/v1/table") as r:
        served = parse_table({k: v for k, v in (await r.json()).items() if k != "type"})
    assert {e.instance: e.tls for e in served.services["catalog"].endpoints} == {
        "c1": True,
        "r1": False,
    }
    # a new root changes the table: a new version, with both roots
    version = publisher(cp).version
    other = Authority.create(clock.time()).pem()[0].decode()
    assert (await cp.post("/v1/trust-bundle", json={"pem": other})).status == 201
    await publisher(cp).rebuild()
    assert publisher(cp).version == version + 1
    assert other in (await pushed(sidecar, version + 1)).trust_bundle


async def test_the_trust_bundle_api(cp: Api, clock: FakeClock) -> None:
    own = trust(cp).authority.certificate
    async with cp.get("/v1/trust-bundle") as r:
        (root,) = (await r.json())["roots"]
    assert root["sha256"] == fingerprint(own)
    assert root["signing"] is True
    assert root["subject"] == "CN=meshlet root cluster.local,O=meshlet"
    other = Authority.create(clock.time()).pem()[0].decode()
    async with cp.post("/v1/trust-bundle", json={"pem": other}) as r:
        assert r.status == 201
        added = await r.json()
    assert (added["signing"], added["pem"]) == (False, other)
    async with cp.post("/v1/trust-bundle", json={"pem": other}) as r:
        assert (r.status, (await r.json())["field"]) == (409, "pem")
    # a leaf (not a CA), garbage, two certificates: 400 naming the field
    _, csr = make_csr(spiffe_id("cluster.local", "shop", "catalog"))
    leaf = trust(cp).sign(csr.decode(), service="catalog", namespace="shop")
    for bad, says in (
        (leaf, "is not a CA certificate"),
        ("junk", "is not a PEM certificate"),
        (other + other, "holds 2 certificates"),
        (7, "must be a PEM certificate"),
    ):
        async with cp.post("/v1/trust-bundle", json={"pem": bad}) as r:
            body = await r.json()
            assert (r.status, body["field"]) == (400, "pem"), body
            assert says in body["error"]
    async with cp.delete(f"/v1/trust-bundle/{fingerprint(own)}") as r:
        assert r.status == 409  # the root that signs now
    async with cp.delete(f"/v1/trust-bundle/{added['sha256']}") as r:
        assert r.status == 204
    async with cp.delete(f"/v1/trust-bundle/{added['sha256']}") as r:
        assert r.status == 404
    async with cp.get("/v1/ca") as r:
        text = await r.text()
    assert x509.load_pem_x509_certificate(text.encode()) == own
    assert "PRIVATE KEY" not in text


async def test_at_most_eight_roots(cp: Api, clock: FakeClock) -> None:
    for _ in range(7):
        pem = Authority.create(clock.time()).pem()[0].decode()
        assert (await cp.post("/v1/trust-bundle", json={"pem": pem})).status == 201
    pem = Authority.create(clock.time()).pem()[0].decode()
    async with cp.post("/v1/trust-bundle", json={"pem": pem}) as r:
        assert r.status == 409
        assert "holds 8 roots" in (await r.json())["error"]


async def test_only_the_admin_token_reads_and_changes_the_trust(make_api: MakeApi) -> None:
    api = await make_api(store=MemoryStore(), join_token=JOIN, token="")
    _, service = await mint(api, "catalog")
    pem = (await call(api, "GET", "/v1/trust-bundle", ADMIN))[1]["roots"][0]["pem"]
    for method, path, body in (
        ("GET", "/v1/trust-bundle", None),
        ("POST", "/v1/trust-bundle", {"pem": pem}),
        ("DELETE", "/v1/trust-bundle/" + "ab" * 32, None),
        ("GET", "/v1/ca", None),
    ):
        for token, expected in (("", 401), (service, 403), (JOIN, 403)):
            async with api.request(
                method, path, json=body, headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == expected, (method, path, token)


async def test_the_ca_and_bundle_survive_a_restart_on_every_durable_store(
    store_kind: str, tmp_path: Path, redis_url: str, make_api: MakeApi, clock: FakeClock
) -> None:
    first = await make_api(store=new_store(store_kind, tmp_path, redis_url))
    ca = trust(first).authority.pem()
    other = Authority.create(clock.time()).pem()[0].decode()
    assert (await first.post("/v1/trust-bundle", json={"pem": other})).status == 201
    await first.close()
    if store_kind == "memory":
        return  # (nothing survives a memory store; the stores' contract covers it)
    second = await make_api(store=new_store(store_kind, tmp_path, redis_url))
    assert trust(second).authority.pem() == ca
    assert other in trust(second).bundle()
    assert len(trust(second).bundle()) == 2


async def _started(store: Store, clock: FakeClock, given: Authority | None = None) -> Trust:
    t = Trust(store, clock, trust_domain="cluster.local", given=given)
    await t.start(await store.load())
    return t


async def test_a_given_ca_replaces_the_stored_one_and_the_old_root_stays(
    clock: FakeClock,
) -> None:
    store = MemoryStore()
    made = await _started(store, clock)
    old_root = fingerprint(made.authority.certificate)
    given = Authority.create(clock.time())
    switched = await _started(store, clock, given)
    assert switched.authority.pem() == given.pem()
    signing = {root.fingerprint: signs for root, signs in switched.roots()}
    assert signing == {old_root: False, fingerprint(given.certificate): True}
    await switched.delete_root(old_root)  # once every workload has rotated
    # a restart without flags keeps the given CA
    assert (await _started(store, clock)).authority.pem() == given.pem()


async def test_an_intermediate_signs_with_its_chain_and_its_root_is_the_admins_to_add(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    root = trustme.CA(key_type=trustme.KeyType.ECDSA)
    intermediate = root.create_child_ca(key_type=trustme.KeyType.ECDSA)
    given = Authority.load(
        intermediate.cert_pem.bytes(), intermediate.private_key_pem.bytes(), clock.time()
    )
    caplog.set_level("WARNING", "meshlet.trust")
    t = await _started(MemoryStore(), clock, given)
    assert t.bundle() == ()  # the intermediate is not a root
    assert "no root of the trust bundle issued the signing CA" in caplog.text
    _, csr = make_csr(spiffe_id("cluster.local", "", "catalog"))
    leaf, chained = x509.load_pem_x509_certificates(
        t.sign(csr.decode(), service="catalog", namespace="").encode()
    )
    assert chained == given.certificate
    added = await t.add_root(root.cert_pem.bytes().decode())
    assert [signs for _, signs in t.roots()] == [True]
    with pytest.raises(Exception, match="the signing CA chains to"):
        await t.delete_root(added.fingerprint)
    leaf.verify_directly_issued_by(chained)


async def test_replicas_sign_with_one_ca_and_share_the_bundle(
    make_api: MakeApi, redis_url: str, clock: FakeClock, tmp_path: Path
) -> None:
    a, b = await replicas(make_api, redis_url)
    assert trust(a).authority.pem() == trust(b).authority.pem()
    other = Authority.create(clock.time())
    pem = other.pem()[0].decode()
    assert (await a.post("/v1/trust-bundle", json={"pem": pem})).status == 201

    async def b_trusts_it() -> bool:
        return pem in trust(b).bundle()

    await eventually(b_trusts_it)
    assert (await b.delete(f"/v1/trust-bundle/{fingerprint(other.certificate)}")).status == 204

    async def a_does_not() -> bool:
        return pem not in trust(a).bundle()

    await eventually(a_does_not)
    # a third replica started with --ca-cert makes the others sign with its CA too
    cert, key = other.pem()
    (tmp_path / "ca.crt").write_bytes(cert)
    (tmp_path / "ca.key").write_bytes(key)
    files = {"ca_cert": str(tmp_path / "ca.crt"), "ca_key": str(tmp_path / "ca.key")}
    c = await make_api(store=open_store(redis_url), **files)
    assert trust(c).authority.pem() == other.pem()

    async def all_sign_with_it() -> bool:
        return all(trust(r).authority.pem() == other.pem() for r in (a, b))

    await eventually(all_sign_with_it)
    assert pem in trust(a).bundle()  # its root joined the bundle with it
