"""Assembly and lifecycle of a control-plane process.

Start-up: open the store, load the registry, the tokens and the lock grants, the CA and the
trust bundle (making a CA on the first start), start the reaper (on a shared store: the
replica's tasks, ``replica``), then listen (HTTPS with
``--tls-cert``) and report ready. Shutdown on SIGTERM or SIGINT, in steps:
  1. not ready (``/readyz`` answers 503)
  2. stop accepting connections
  3. let in-flight requests finish, up to ``shutdown_timeout``
  4. cancel the reaper, save when tokens were last used (a replica: its last batch of
     heartbeats, and the reaper's lease handed back)
  5. close the store
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import uvloop
from aiohttp import web

from control_plane import api
from control_plane.access import Tokens
from control_plane.clock import Clock, SystemClock
from control_plane.config import ControlPlaneConfig, is_loopback_host
from control_plane.errors import ConfigError, StoreError
from control_plane.flags import setup_logging
from control_plane.locks import Locks
from control_plane.metrics import Metrics
from control_plane.openapi import build_spec
from control_plane.publisher import Publisher
from control_plane.reaper import run_reaper
from control_plane.registry import Registry
from control_plane.replica import Replica
from control_plane.schema import MAX_BODY_BYTES
from control_plane.store import Store, open_store
from control_plane.trust import Trust, load_given

if TYPE_CHECKING:
    from control_plane.store_redis import RedisStore

log = logging.getLogger("meshlet.control_plane")

STORE = web.AppKey("store", Store)
REPLICA = web.AppKey("replica", Replica)
TOKEN_FLUSH_EVERY = 60.0
"""seconds between saves of when tokens were last used"""
STORE_PROBE_EVERY = 2.0
"""seconds between writes that check the store still takes them (``/readyz``)"""


def build_app(
    config: ControlPlaneConfig, *, clock: Clock | None = None, store: Store | None = None
) -> web.Application:
    """The aiohttp application; its cleanup context owns the store and the reaper."""
    store = store if store is not None else open_store(config.store)
    clock = clock if clock is not None else SystemClock()
    app = web.Application(middlewares=[api.guard], client_max_size=MAX_BODY_BYTES)
    app[STORE] = store
    registry = Registry(
        store,
        clock,
        heartbeat_ttl=config.heartbeat_ttl,
        remove_after=config.remove_after,
        protect_percent=config.protect_percent,
        protect_max=config.protect_max,
        loopback=config.loopback_instances,
        max_instances=config.max_instances,
        max_per_service=config.max_instances_per_service,
    )
    app[api.REGISTRY] = registry
    trust = Trust(
        store,
        clock,
        trust_domain=config.trust_domain,
        given=load_given(config, clock.time()),
        ttl=config.cert_ttl,
    )
    app[api.TRUST] = trust
    publisher = Publisher(
        registry,
        store,
        quiet=config.debounce_quiet,
        max_wait=config.debounce_max,
        clock=clock,
        trust=trust,
    )
    app[api.PUBLISHER] = publisher
    tokens = Tokens(store, clock, admin_token=config.admin_token, join_token=config.join_token)
    app[api.TOKENS] = tokens
    locks = Locks(store)
    app[api.LOCKS] = locks
    replica = None
    if store.shared:
        replica = Replica(
            cast("RedisStore", store),
            registry,
            tokens,
            locks,
            publisher,
            clock,
            lease_ttl=config.lease_ttl,
            trust=trust,
        )
        app[REPLICA] = replica
    app[api.METRICS] = Metrics(registry, publisher, tokens, locks, replica, trust)
    app[api.READY] = api.Readiness()
    app[api.OPENAPI] = json.dumps(build_spec(), indent=1).encode()
    api.add_routes(app)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_streams)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    registry, publisher, tokens = app[api.REGISTRY], app[api.PUBLISHER], app[api.TOKENS]
    replica = app.get(REPLICA)
    try:
        # a replica takes the shared health too: its first table is the others'
        snapshot = await (registry.start() if replica is None else replica.start())
        await app[api.TRUST].start(snapshot)
        await publisher.start(
            snapshot.table_version, snapshot.table_digest, snapshot.epoch, snapshot.table_built
        )
    except BaseException:
        await app[STORE].close()
        raise
    tokens.load(snapshot.tokens)
    app[api.LOCKS].load(snapshot.lock_grants)
    if snapshot.tokens and not tokens.admin_configured:
        log.warning(
            "%d service tokens in the store guard nothing: without --admin-token the API is open",
            len(snapshot.tokens),
        )
    background = asyncio.create_task(
        _background(registry, publisher, tokens, app[STORE], app[api.READY], replica),
        name="background",
    )
    background.add_done_callback(lambda task: _crashed(task, app))
    app[api.READY].ready = True
    yield
    app[api.READY].ready = False
    background.cancel()  # step 4
    await _stopped(background)
    with contextlib.suppress(StoreError):
        await tokens.flush()
    if replica is not None:
        await replica.close()  # the lease handed on at once
    await app[STORE].close()  # step 5


async def _background(
    registry: Registry,
    publisher: Publisher,
    tokens: Tokens,
    store: Store,
    ready: api.Readiness,
    replica: Replica | None,
) -> None:
    """The control plane's own tasks, in one group: the reaper (a replica's own tasks,
    whose reaper runs under a lease), the publisher, saving when tokens were last used, and a
    probe of the store's writes for readiness."""
    async with asyncio.TaskGroup() as tasks:
        if replica is not None:
            tasks.create_task(replica.run(), name="replica")
        else:
            interval = min(1.0, registry.heartbeat_ttl / 4)
            tasks.create_task(run_reaper(registry.expire, interval), name="reaper")
        tasks.create_task(publisher.run(), name="publisher")
        tasks.create_task(run_reaper(tokens.flush, TOKEN_FLUSH_EVERY), name="token-flush")
        tasks.create_task(_probe_store(store, ready), name="store-probe")


STOP_WITHIN = 10.0
"""seconds the background tasks get to finish once cancelled"""


async def _stopped(background: asyncio.Task[None]) -> None:
    """Wait for the cancelled background tasks; one that does not stop within STOP_WITHIN is
    a bug: logged with where every task still waits, and shutdown goes on without it."""
    done, _ = await asyncio.wait([background], timeout=STOP_WITHIN)
    if done:
        with contextlib.suppress(asyncio.CancelledError):
            background.result()
        return
    log.error("bug: background tasks did not stop within %.0fs; going on", STOP_WITHIN)
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            log.error("still running: %r", task, stack_info=False)
            for frame in task.get_stack(limit=8):
                log.error(
                    "    %s:%d in %s",
                    frame.f_code.co_filename,
                    frame.f_lineno,
                    frame.f_code.co_name,
                )


async def _probe_store(store: Store, ready: api.Readiness) -> None:
    """A write every ``STORE_PROBE_EVERY`` seconds: not ready while the store refuses them,
    ready again as soon as one goes through."""
    while True:
        await asyncio.sleep(STORE_PROBE_EVERY)
        try:
            await store.probe()
        except StoreError as e:
            ready.store_failed(e)
        else:
            ready.store_works()


def _crashed(task: asyncio.Task[None], app: web.Application) -> None:
    if not task.cancelled() and task.exception() is not None:
        app[api.READY].ready = False
        log.error("bug: a background task died; not ready", exc_info=task.exception())


async def _close_streams(app: web.Application) -> None:
    """Shutdown: sidecar streams last forever, so close them rather than wait for them."""
    await app[api.PUBLISHER].close_sessions()


async def serve(config: ControlPlaneConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (by default: until SIGTERM or SIGINT)."""
    stop = stop if stop is not None else _stop_on_signals()
    tls = tls_context(config)
    _warn_about_access(config)
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=tls)
        await site.start()
        host, port = runner.addresses[0][:2]
        log.info("listening on %s (store %s)", _url(host, port, tls), config.store)
        await stop.wait()
        log.info("shutting down")
        app[api.READY].ready = False  # step 1
    finally:
        await runner.cleanup()  # steps 2-5
    log.info("stopped")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def tls_context(config: ControlPlaneConfig) -> ssl.SSLContext | None:
    """The server side of HTTPS from ``--tls-cert`` and ``--tls-key`` (TLS 1.2 at least)."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except OSError as e:  # ssl.SSLError among them
        reason = e.strerror or str(e)
        raise ConfigError(
            "tls_cert", f"cannot load {config.tls_cert} and {config.tls_key}: {reason}"
        ) from None
    return context


def _warn_about_access(config: ControlPlaneConfig) -> None:
    if config.join_token and not config.admin_token:
        log.warning(
            "--join-token without --admin-token: nobody may read the registry, set policies, "
            "drain or mint tokens"
        )
    elif not config.admin_token and not is_loopback_host(config.host):
        log.warning("no --admin-token: anyone who reaches %s may change the mesh", config.url)


def _url(host: str, port: int, tls: ssl.SSLContext | None) -> str:
    scheme = "https" if tls is not None else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def run(config: ControlPlaneConfig) -> int:
    """Run a control plane in this process; the exit code."""
    setup_logging(config.log_level)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    except (StoreError, ConfigError) as e:
        log.error("cannot start: %s", e)
        return 2
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, e.strerror or e)
        return 2
    return 0
