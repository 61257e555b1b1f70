"""The control plane's Prometheus metrics, served at ``GET /metrics``.

Each ``Metrics`` owns its ``CollectorRegistry`` (never prometheus_client's global one), so one
process can hold several control planes, as the tests do. Nearly everything is read at scrape
time from the registry and the publisher, which count events in plain integers: the write
path and the heartbeat hot path pay one ``+= 1``, with no lock and no label lookup (a
prometheus_client ``Counter.inc`` takes a lock). Only the convergence histogram is observed
as it happens, a few times per table version.

| metric | type | labels | meaning |
|---|---|---|---|
| ``meshlet_registry_instances`` | gauge | service, status | instances by status |
| ``meshlet_heartbeats_total`` | counter | | heartbeats accepted, REST and stream |
| ``meshlet_instances_expired_total`` | counter | | instances removed for missed heartbeats |
| ``meshlet_protection_active`` | gauge | service | 1 while protection holds some of its instances |
| ``meshlet_protection_outlasted`` | gauge | | 1 once protection held for --protect-max |
| ``meshlet_protection_released_total`` | counter | | held instances expired after that |
| ``meshlet_stream_refusals_total`` | counter | reason | hellos refused: scope, owned, rest, ... |
| ``meshlet_api_refusals_total`` | counter | status | calls refused for their token (401, 403) |
| ``meshlet_connected_sidecars`` | gauge | | open push streams |
| ``meshlet_pushes_total`` | counter | | tables sent to sidecars |
| ``meshlet_nacks_total`` | counter | | tables sidecars refused |
| ``meshlet_stream_bad_messages_total`` | counter | | stream messages that did not parse |
| ``meshlet_push_convergence_seconds`` | histogram | | registry change to the last ACK |
| ``meshlet_lock_acquisitions_total`` | counter | | locks taken (``POST .../locks/NAME``) |
| ``meshlet_lock_refusals_total`` | counter | | acquisitions answered 409 (still held) |
| ``meshlet_lock_renewals_total`` | counter | | leases renewed |
| ``meshlet_lock_releases_total`` | counter | | locks released by their holder |
| ``meshlet_lock_waiting`` | gauge | | acquisitions waiting for a holder now |
| ``meshlet_cp_certificates_issued_total`` | counter | service | workload certificates signed |
| ``meshlet_cp_csr_refused_total`` | counter | reason | CSRs refused: too_large, invalid, ... |
| ``meshlet_cp_trust_bundle_roots`` | gauge | | roots in the trust bundle pushed to sidecars |
| ``meshlet_cp_ca_expiry_timestamp_seconds`` | gauge | | when the signing CA expires |
| ``meshlet_replica_reaper`` | gauge | | replicas: 1 while its lease is good by its own clock |
| ``meshlet_replica_leases_acquired_total`` | counter | | replicas: times it took the lease |
| ``meshlet_replica_leases_lost_total`` | counter | | replicas: a fenced write or renewal failed |
| ``meshlet_replica_resyncs_total`` | counter | | replicas: reloads after falling behind |

plus the ``process_*``, ``python_info`` and ``python_gc_*`` collectors.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from control_plane.access import Tokens
from control_plane.locks import Locks
from control_plane.publisher import Publisher
from control_plane.registry import Registry
from control_plane.replica import Replica
from control_plane.trust import REFUSAL_REASONS, Trust

CONTENT_TYPE = CONTENT_TYPE_LATEST

# from a quick push on a small mesh (the 100 ms debounce and a round trip) to a busy one
# pushed at the 2 s debounce limit, and beyond to a sidecar that is slow to apply tables
CONVERGENCE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    """One control plane's metrics; ``render()`` is the ``/metrics`` body."""

    def __init__(
        self,
        registry: Registry,
        publisher: Publisher,
        tokens: Tokens,
        locks: Locks,
        replica: Replica | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.collectors = CollectorRegistry()
        ProcessCollector(registry=self.collectors)
        PlatformCollector(registry=self.collectors)
        GCCollector(registry=self.collectors)
        self.collectors.register(_Snapshot(registry, publisher, tokens, locks))
        if replica is not None:
            self.collectors.register(_ReplicaSnapshot(replica))
        if trust is not None:
            self.collectors.register(_TrustSnapshot(trust))
        self.convergence = Histogram(
            "meshlet_push_convergence_seconds",
            "Seconds from a registry change to the last ACK of the table version carrying it, "
            "from the sidecars connected when it was published (see control_plane/convergence)",
            buckets=CONVERGENCE_BUCKETS,
            registry=self.collectors,
        )
        publisher.convergence.on_converged(self.convergence.observe)

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.collectors)


class _Snapshot(Collector):
    """Everything that is read from the registry and the publisher at scrape time."""

    def __init__(
        self, registry: Registry, publisher: Publisher, tokens: Tokens, locks: Locks
    ) -> None:
        self._registry = registry
        self._publisher = publisher
        self._tokens = tokens
        self._locks = locks

    def collect(self) -> Iterator[Metric]:
        registry, publisher = self._registry.statistics(), self._publisher.statistics()
        instances = GaugeMetricFamily(
            "meshlet_registry_instances",
            "Registered instances by service and status (healthy, unhealthy, draining)",
            labels=["service", "status"],
        )
        protection = GaugeMetricFamily(
            "meshlet_protection_active",
            "1 while expiry protection holds some of the service's instances past their "
            "heartbeat TTL; protection is registry-wide, max() of this says whether it is on",
            labels=["service"],
        )
        held = self._registry.protected()
        for service in self._registry.services():
            for status, count in service.counts.items():
                instances.add_metric([service.name, status.value], count)
            protection.add_metric([service.name], 1 if service.name in held else 0)
        yield instances
        yield protection
        yield CounterMetricFamily(
            "meshlet_heartbeats",
            "Heartbeats accepted: REST heartbeats and heartbeat messages over sidecar streams",
            value=registry.heartbeats + publisher.heartbeats,
        )
        yield CounterMetricFamily(
            "meshlet_instances_expired",
            "Instances the reaper removed after --remove-after without a heartbeat (turning "
            "unhealthy after the TTL is not counted here)",
            value=registry.expired,
        )
        yield GaugeMetricFamily(
            "meshlet_connected_sidecars", "Open sidecar push streams", value=publisher.sidecars
        )
        yield CounterMetricFamily(
            "meshlet_pushes", "Routing tables sent to sidecars", value=publisher.pushes
        )
        yield CounterMetricFamily(
            "meshlet_nacks", "Routing tables sidecars refused (NACKs)", value=publisher.nacks
        )
        yield CounterMetricFamily(
            "meshlet_stream_bad_messages",
            "Stream messages from sidecars that did not parse or were not expected (each "
            "sidecar's are logged a few per 10 s)",
            value=publisher.bad_messages,
        )
        yield GaugeMetricFamily(
            "meshlet_protection_outlasted",
            "1 once protection has held for --protect-max: held instances expire again, at "
            "most 10% of all instances per heartbeat TTL",
            value=1 if registry.outlasted else 0,
        )
        yield CounterMetricFamily(
            "meshlet_protection_released",
            "Instances protection held but let go after --protect-max",
            value=registry.released,
        )
        refused = CounterMetricFamily(
            "meshlet_stream_refusals",
            "Sidecar hellos refused, by reason: scope (another service than the token's), "
            "admin (the admin registered the instance), owned (another node's live stream owns "
            "it), rest (registered over REST), address (not routable), full (registry limits)",
            labels=["reason"],
        )
        for reason in ("scope", "admin", "owned", "rest", "address", "full"):
            refused.add_metric([reason], publisher.refused.get(reason, 0))
        yield refused
        api_refused = CounterMetricFamily(
            "meshlet_api_refusals",
            "Calls refused for their token: 401 none or unknown, 403 not allowed to",
            labels=["status"],
        )
        for code in (401, 403):
            api_refused.add_metric([str(code)], self._tokens.refusals[code])
        yield api_refused
        yield from _lock_metrics(self._locks)


def _lock_metrics(locks: Locks) -> Iterator[Metric]:
    s = locks.statistics()
    yield CounterMetricFamily(
        "meshlet_lock_acquisitions",
        "App locks taken, with a new fencing token",
        value=s.acquisitions,
    )
    yield CounterMetricFamily(
        "meshlet_lock_refusals",
        "Lock acquisitions refused (409): still held by another after wait_ms",
        value=s.refusals,
    )
    yield CounterMetricFamily(
        "meshlet_lock_renewals", "Lock leases renewed by their holder", value=s.renewals
    )
    yield CounterMetricFamily(
        "meshlet_lock_releases", "Locks released by their holder", value=s.releases
    )
    yield GaugeMetricFamily(
        "meshlet_lock_waiting", "Lock acquisitions waiting for a holder now", value=s.waiting
    )


class _ReplicaSnapshot(Collector):
    """A replica's part in the lease and the change stream."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        replica = self._replica
        yield GaugeMetricFamily(
            "meshlet_replica_reaper",
            "1 while this replica holds the reaper's lease (expiry runs on one replica)",
            value=1 if replica.leading else 0,
        )
        yield CounterMetricFamily(
            "meshlet_replica_leases_acquired",
            "Times this replica took the reaper's lease",
            value=replica.acquired,
        )
        yield CounterMetricFamily(
            "meshlet_replica_leases_lost",
            "Times this replica lost the reaper's lease while holding it: a fenced write "
            "refused (another replica holds it now) or a renewal that failed",
            value=replica.lost,
        )
        yield CounterMetricFamily(
            "meshlet_replica_resyncs",
            "Times this replica fell behind the change stream's retention and reloaded the "
            "whole registry",
            value=replica.resyncs,
        )


class _TrustSnapshot(Collector):
    """The CA's counters (``trust.Trust``), read at scrape time."""

    def __init__(self, trust: Trust) -> None:
        self._trust = trust

    def collect(self) -> Iterator[Metric]:
        stats = self._trust.statistics()
        issued = CounterMetricFamily(
            "meshlet_cp_certificates_issued",
            "Workload certificates signed for sidecars' CSRs, by service",
            labels=["service"],
        )
        for service, count in sorted(stats.issued.items()):
            issued.add_metric([service], count)
        yield issued
        refused = CounterMetricFamily(
            "meshlet_cp_csr_refused",
            "CSRs refused, by reason: too_large, invalid (not a P-256 CSR signed by its key), "
            "identity (another than the stream's), rate (over 10 a minute on a stream)",
            labels=["reason"],
        )
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], stats.refused.get(reason, 0))
        yield refused
        yield GaugeMetricFamily(
            "meshlet_cp_trust_bundle_roots",
            "Root certificates in the trust bundle pushed to sidecars",
            value=stats.roots,
        )
        yield GaugeMetricFamily(
            "meshlet_cp_ca_expiry_timestamp_seconds",
            "When the signing CA's certificate expires (0 before it is loaded)",
            value=stats.ca_not_after,
        )
