"""A store in Redis (``redis.asyncio``), which several control-plane replicas can share.

Every key starts with a prefix (``meshlet:`` unless ``?prefix=`` says otherwise), so one Redis
database can hold several meshes:

    {p}meta          hash   epoch, table_version, table_digest, table_built, lapsed (JSON)
    {p}policies      hash   service -> policy document (JSON)
    {p}instances     hash   "service/id" -> instance record (JSON)
    {p}tokens        hash   token id -> token record without its last use (JSON)
    {p}token-used    hash   token id -> when it was last used (a float's repr)
    {p}probe         string the readiness probe's write
    {p}lock:KEY      string an app lock's holder: its fencing token, with the lease as TTL
    {p}lock-fence    counter the last fencing token handed out (for every lock)
    {p}lock-grants   hash   shared lock name -> the services it is granted to (JSON)
    {p}ca            string the signing CA: {"cert", "key"} (JSON; set once with SET NX)
    {p}trust-bundle  hash   root fingerprint -> its PEM

and what replicas share (``control_plane.replica``):

    {p}changes       stream what each write changed: kind (p policy, i instance, t token,
                            h health, g lock grant, b trust-bundle root, c the CA) and key;
                            replicas follow it and read the current value
    {p}seen          hash   "service/id" -> wall-clock time of its last heartbeat, written in
                            batches by each replica
    {p}health        hash   "service/id" -> "lapsed", "sick" (its app is unhealthy) or both;
                            absent: healthy
    {p}sidecars      hash   replica -> the sidecars connected to it (JSON, with a time limit)
    {p}reaper        string the reaper's lease: its holder, with a TTL (``SET NX PX``)
    {p}reaper:fence  counter the lease's fencing token, one more on every acquisition

Each call is one round trip: a single command, a ``MULTI``/``EXEC`` pipeline, or a Lua script
where a write depends on what is there. A call that cannot reach Redis within ``TIMEOUT``
raises ``StoreError`` and, Redis being one server, changed nothing or everything of that one
transaction.

The password never travels in the URL (it would show in ``ps`` and in logs): it comes from
``MESHLET_REDIS_PASSWORD`` or the file named by ``MESHLET_REDIS_PASSWORD_FILE``. ``rediss://``
speaks TLS; ``?ssl_ca_certs=PATH`` names the CA bundle the server's certificate must chain to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control_plane.errors import ConfigError, StoreError
from control_plane.locks import LockGrant
from control_plane.model import Health, InstanceRecord, Origin, TokenRecord
from control_plane.store import Changes, Fence, Snapshot
from control_plane.wire import Policy, WireError, parse_policy, to_json

T = TypeVar("T")

TIMEOUT = 2.0
"""seconds a connect or a call may take before the store counts as unavailable"""
PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PASSWORD_ENV = "MESHLET_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "MESHLET_REDIS_PASSWORD_FILE"
_QUERY = ("prefix", "ssl_ca_certs")

CHANGES_KEPT = 100_000
"""entries of the change stream kept (about): a replica further behind reloads everything"""

# touch_tokens: a last use is kept only for a token that is still stored
_TOUCH = """
for i = 1, #ARGV, 2 do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
        redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    end
end
"""


# The reaper's lease (KEYS: lease, fence). Acquire: the lease if free, and the next token.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return redis.call('INCR', KEYS[2])
end
return false
"""
# Renew (ARGV: holder, ms) and release (ARGV: holder): only by the holder (KEYS: the lease or
# the lock; a lock's holder is its token).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# Health pairs (key, value; "" for healthy) from ARGV[first] to the one before the last ARGV
# (the change stream's length), for instances still registered, each with its change entry.
_PUT_HEALTH = """
local function put_health(first, instances, health, changes)
    for i = first, #ARGV - 1, 2 do
        if redis.call('HEXISTS', instances, ARGV[i]) == 1 then
            if ARGV[i + 1] == '' then
                redis.call('HDEL', health, ARGV[i])
            else
                redis.call('HSET', health, ARGV[i], ARGV[i + 1])
            end
            redis.call('XADD', changes, 'MAXLEN', '~', ARGV[#ARGV], '*', 'k', 'h', 'key', ARGV[i])
        end
    end
end
"""
# The reaper's writes, fenced: they happen only while KEYS[1] (the lease) is held by ARGV[1]
# and the fence is still ARGV[2] (nobody acquired the lease since). KEYS: lease, fence,
# instances, health, seen, changes. ARGV: holder, token, removed count, removed keys, then
# health pairs (key, value; "" for healthy).
_EXPIRE = (
    _PUT_HEALTH
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
    return 0
end
local removed = tonumber(ARGV[3])
for i = 4, 3 + removed do
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('HDEL', KEYS[4], ARGV[i])
    redis.call('HDEL', KEYS[5], ARGV[i])
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[#ARGV], '*', 'k', 'i', 'key', ARGV[i])
end
put_health(4 + removed, KEYS[3], KEYS[4], KEYS[6])
return 1
"""
)
# App locks (KEYS: the lock, the fence). Acquire: free -> the next token, held for ARGV[1] ms;
# renewed and released with _RENEW and _RELEASE.
_LOCK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""
# Renew (ARGV: token, ms) and release (ARGV: token): only by the token that holds it.
# A replica's batch of liveness, for instances still registered. KEYS: instances, seen,
# health, changes. ARGV: seen count, seen pairs (key, time), health pairs (key, value; "" for
# healthy), then the change stream's length.
_SHARE = (
    _PUT_HEALTH
    + """
local seen = tonumber(ARGV[1])
for i = 2, 2 * seen, 2 do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
        redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    end
end
put_health(2 + 2 * seen, KEYS[1], KEYS[3], KEYS[4])
"""
)
# Where the change stream stands: its last id ("0-0": none yet), how many entries were ever
# added to it, and how many it holds (the rest were trimmed, oldest first). KEYS: changes.
_POSITION = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return {'0-0', 0, 0}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local found = {}
for i = 1, #info, 2 do
    found[info[i]] = info[i + 1]
end
return {found['last-generated-id'], found['entries-added'], found['length']}
"""
# A table version for a table's digest: the current one when it has the same content, else
# the next. KEYS: meta. ARGV: digest, built, lapsed.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'table_digest') == ARGV[1] then
    return {tonumber(redis.call('HGET', KEYS[1], 'table_version')),
            redis.call('HGET', KEYS[1], 'table_built')}
end
local version = redis.call('HINCRBY', KEYS[1], 'table_version', 1)
redis.call('HSET', KEYS[1], 'table_digest', ARGV[1], 'table_built', ARGV[2], 'lapsed', ARGV[3])
return {version, ARGV[2]}
"""


# The CA, set once (KEYS: ca, trust bundle, changes; ARGV: the CA's JSON, the root's
# fingerprint and PEM or two empty strings, the change stream's length): the CA stored now.
_INIT_CA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
    if ARGV[2] ~= '' then
        redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'k', 'b', 'key', ARGV[2])
    end
end
return redis.call('GET', KEYS[1])
"""


def _key(service: str, instance_id: str) -> str:
    return f"{service}/{instance_id}"


def _still_cancelled(task: asyncio.Task[Any] | None, before: int) -> None:
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


def _split(key: str) -> tuple[str, str]:
    service, _, instance_id = key.partition("/")
    return service, instance_id


def _services(document: str) -> frozenset[str]:
    return frozenset(json.loads(document))


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class RedisStore:
    shared = True
    """several control planes may share it (``control_plane.replica``)"""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "meshlet:",
        password: str | None = None,
        ssl_ca_certs: str | None = None,
    ) -> None:
        self.url = url
        """the server, without credentials (for logs)"""
        self.prefix = prefix
        options: dict[str, Any] = {
            "socket_timeout": TIMEOUT,
            "socket_connect_timeout": TIMEOUT,
            "decode_responses": True,
            "password": password,
            "protocol": 2,  # the replies' shapes this module reads
        }
        if ssl_ca_certs:
            options["ssl_ca_certs"] = ssl_ca_certs
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url, **options)
        self._touch = self._redis.register_script(_TOUCH)
        p = prefix
        self._meta, self._policies, self._instances = f"{p}meta", f"{p}policies", f"{p}instances"
        self._tokens, self._used, self._probe = f"{p}tokens", f"{p}token-used", f"{p}probe"
        self._changes, self._seen, self._health = f"{p}changes", f"{p}seen", f"{p}health"
        self._lease, self._fence = f"{p}reaper", f"{p}reaper:fence"
        self._sidecars = f"{p}sidecars"
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._expire = self._redis.register_script(_EXPIRE)
        self._claim = self._redis.register_script(_CLAIM)
        self._share = self._redis.register_script(_SHARE)
        self._position = self._redis.register_script(_POSITION)
        self._lock = self._redis.register_script(_LOCK)
        self._lock_fence, self._grants = f"{p}lock-fence", f"{p}lock-grants"
        self._ca, self._bundle = f"{p}ca", f"{p}trust-bundle"
        self._init_ca = self._redis.register_script(_INIT_CA)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """``redis://HOST:PORT/DB`` or ``rediss://`` (TLS), with ``?prefix=`` and
        ``?ssl_ca_certs=``; ConfigError naming what is wrong."""
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None or parts.username is not None:
            raise ConfigError(
                "store",
                f"put no credentials in the redis URL (they would show in ps and in logs): "
                f"set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}",
            )
        if not parts.hostname:
            raise ConfigError("store", "a redis URL needs a host: redis://HOST:PORT/DB")
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise ConfigError("store", f"bad port in {url!r}") from None
        if parts.path not in ("", "/") and not parts.path[1:].isdigit():
            raise ConfigError("store", f"the redis database must be a number: {parts.path[1:]!r}")
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, max_num_fields=8)
        unknown = sorted(set(query) - set(_QUERY))
        if unknown:
            raise ConfigError(
                "store", f"unknown redis URL parameter {unknown[0]!r} (known: prefix, ssl_ca_certs)"
            )
        prefix = query.get("prefix", ["meshlet"])[-1]
        if PREFIX.fullmatch(prefix) is None:
            raise ConfigError("store", "prefix must be 1-64 of A-Z, a-z, 0-9, '.', '_', ':', '-'")
        ca = query.get("ssl_ca_certs", [""])[-1]
        if ca and parts.scheme != "rediss":
            raise ConfigError("store", "ssl_ca_certs verifies a rediss:// (TLS) server")
        server = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return cls(server, prefix=f"{prefix}:", password=_password(), ssl_ca_certs=ca or None)

    async def _call(self, call: Awaitable[T]) -> T:
        """Every call: a Redis failure as StoreError, and a cancellation kept. redis-py's
        asyncio client can swallow the cancellation of a task whose command is in flight and
        return (or fail) as if nothing happened (redis-py#2028, #2665): a replica's loops and
        the publisher then never stopped on SIGTERM. Whatever the call did, a task cancelled
        meanwhile is cancelled."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            result = await call
        except (RedisError, OSError) as e:
            _still_cancelled(task, cancels)
            raise StoreError(f"redis {self.url}: {e}") from e
        _still_cancelled(task, cancels)
        return result

    async def _transaction(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The commands in one MULTI/EXEC: one round trip, all or nothing."""
        pipe = self._redis.pipeline(transaction=True)
        for command in commands:
            pipe.execute_command(*command)
        return await self._call(pipe.execute())

    async def load(self) -> Snapshot:
        _, meta, policies, instances, tokens, used, grants, ca, bundle = await self._transaction(
            ("HSETNX", self._meta, "epoch", secrets.token_hex(8)),
            ("HGETALL", self._meta),
            ("HGETALL", self._policies),
            ("HGETALL", self._instances),
            ("HGETALL", self._tokens),
            ("HGETALL", self._used),
            ("HGETALL", self._grants),
            ("GET", self._ca),
            ("HGETALL", self._bundle),
        )
        return Snapshot(
            {service: self._policy(service, document) for service, document in policies.items()},
            sorted(
                (self._instance(key, document) for key, document in instances.items()),
                key=lambda r: r.key,
            ),
            table_version=int(meta.get("table_version", 0)),
            table_digest=meta.get("table_digest", ""),
            table_built=float(meta.get("table_built", 0)),
            epoch=meta["epoch"],
            lapsed=frozenset(
                (service, instance) for service, instance in json.loads(meta.get("lapsed", "[]"))
            ),
            tokens=[self._token(i, document, used.get(i)) for i, document in tokens.items()],
            lock_grants={name: _services(value) for name, value in grants.items()},
            ca=None if ca is None else self._ca_pair(ca),
            trust_bundle=bundle,
        )

    def _ca_pair(self, document: str) -> tuple[str, str]:
        try:
            d = json.loads(document)
            return str(d["cert"]), str(d["key"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"redis {self.url}: the stored CA is invalid: {e}") from e

    def _policy(self, service: str, document: str) -> Policy:
        try:
            return parse_policy(json.loads(document))
        except (ValueError, WireError) as e:
            raise StoreError(
                f"redis {self.url}: stored policy of {service!r} is invalid: {e}"
            ) from e

    def _instance(self, key: str, document: str) -> InstanceRecord:
        service, _, instance_id = key.partition("/")
        try:
            d = json.loads(document)
            return InstanceRecord(
                service,
                instance_id,
                d["address"],
                d["port"],
                zone=d["zone"],
                weight=d["weight"],
                metadata=d["metadata"],
                draining=d["draining"],
                origin=Origin(d["origin"]),
                namespace=d["namespace"],
                tls=d.get("tls", False),
            )
        except (ValueError, KeyError, TypeError, WireError) as e:
            raise StoreError(f"redis {self.url}: stored instance {key!r} is invalid: {e}") from e

    def _token(self, token_id: str, document: str, used: str | None) -> TokenRecord:
        try:
            d = json.loads(document)
            return TokenRecord(
                token_id,
                d["service"],
                d["description"],
                d["digest"],
                d["created"],
                None if used is None else float(used),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"redis {self.url}: stored token {token_id!r} is invalid: {e}") from e

    def _changed(self, kind: str, key: str) -> tuple[Any, ...]:
        """The change stream's entry for a write (in the write's transaction)."""
        return ("XADD", self._changes, "MAXLEN", "~", CHANGES_KEPT, "*", "k", kind, "key", key)

    async def put_policy(self, service: str, policy: Policy) -> None:
        await self._transaction(
            ("HSET", self._policies, service, _dumps(to_json(policy))),
            self._changed("p", service),
        )

    async def delete_policy(self, service: str) -> None:
        await self._transaction(("HDEL", self._policies, service), self._changed("p", service))

    async def put_instance(self, record: InstanceRecord) -> None:
        document = {
            "address": record.address,
            "port": record.port,
            "zone": record.zone,
            "weight": record.weight,
            "metadata": record.metadata,
            "draining": record.draining,
            "origin": record.origin.value,
            "namespace": record.namespace,
            "tls": record.tls,
        }
        key = _key(record.service, record.id)
        await self._transaction(
            ("HSET", self._instances, key, _dumps(document)), self._changed("i", key)
        )

    async def delete_instances(self, keys: Sequence[tuple[str, str]]) -> None:
        if keys:
            fields = [_key(service, instance_id) for service, instance_id in keys]
            await self._transaction(
                ("HDEL", self._instances, *fields),
                ("HDEL", self._health, *fields),
                ("HDEL", self._seen, *fields),
                *(self._changed("i", key) for key in fields),
            )

    async def put_table_version(
        self, version: int, digest: str, lapsed: frozenset[tuple[str, str]], built: float = 0.0
    ) -> None:
        fields = {
            "table_version": str(version),
            "table_digest": digest,
            "table_built": repr(built),
            "lapsed": _dumps(sorted(lapsed)),
        }
        await self._call(self._redis.hset(self._meta, mapping=cast(Any, fields)))

    async def put_token(self, record: TokenRecord) -> None:
        document = {
            "service": record.service,
            "description": record.description,
            "digest": record.digest,
            "created": record.created,
        }
        await self._transaction(
            ("HSET", self._tokens, record.id, _dumps(document)),
            ("HDEL", self._used, record.id),
            self._changed("t", record.id),
        )

    async def delete_token(self, token_id: str) -> None:
        await self._transaction(
            ("HDEL", self._tokens, token_id),
            ("HDEL", self._used, token_id),
            self._changed("t", token_id),
        )

    async def touch_tokens(self, used: dict[str, float]) -> None:
        if used:
            argv = [item for token_id, when in used.items() for item in (token_id, repr(when))]
            await self._call(self._touch(keys=[self._tokens, self._used], args=argv))

    async def acquire_lock(self, key: str, ttl_ms: int) -> LockGrant | None:
        token = await self._call(
            self._lock(keys=[f"{self.prefix}lock:{key}", self._lock_fence], args=[ttl_ms])
        )
        return None if token is None else LockGrant(int(token), ttl_ms)

    async def renew_lock(self, key: str, token: int, ttl_ms: int) -> int | None:
        lock = f"{self.prefix}lock:{key}"
        renewed = await self._call(self._renew(keys=[lock], args=[str(token), ttl_ms]))
        return ttl_ms if renewed else None

    async def release_lock(self, key: str, token: int) -> bool:
        lock = f"{self.prefix}lock:{key}"
        return bool(await self._call(self._release(keys=[lock], args=[str(token)])))

    async def put_lock_grant(self, name: str, services: frozenset[str]) -> None:
        await self._transaction(
            ("HSET", self._grants, name, _dumps(sorted(services))), self._changed("g", name)
        )

    async def delete_lock_grant(self, name: str) -> None:
        await self._transaction(("HDEL", self._grants, name), self._changed("g", name))

    async def init_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> tuple[str, str]:
        fingerprint, pem = root if root is not None else ("", "")
        argv: list[str | int] = [_dumps({"cert": cert, "key": key}), fingerprint, pem]
        keys = [self._ca, self._bundle, self._changes]
        stored = await self._call(self._init_ca(keys=keys, args=[*argv, CHANGES_KEPT]))
        return self._ca_pair(str(stored))

    async def replace_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> None:
        adds = [] if root is None else [("HSET", self._bundle, *root), self._changed("b", root[0])]
        await self._transaction(
            ("SET", self._ca, _dumps({"cert": cert, "key": key})),
            *adds,
            self._changed("c", "ca"),
        )

    async def load_ca(self) -> tuple[str, str] | None:
        """The CA stored now (another replica may have replaced it)."""
        document = await self._call(self._redis.get(self._ca))
        return None if document is None else self._ca_pair(str(document))

    async def put_root(self, fingerprint: str, pem: str) -> None:
        await self._transaction(
            ("HSET", self._bundle, fingerprint, pem), self._changed("b", fingerprint)
        )

    async def delete_root(self, fingerprint: str) -> None:
        await self._transaction(
            ("HDEL", self._bundle, fingerprint), self._changed("b", fingerprint)
        )

    async def probe(self) -> None:
        await self._call(self._redis.set(self._probe, repr(time.time())))

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            async with asyncio.timeout(TIMEOUT):
                await self._redis.aclose()

    # -- what replicas share (control_plane.replica) ---------------------------------------

    async def position(self) -> tuple[str, int]:
        """Where the change stream stands: the id to follow after, and how many entries were
        ever added up to it."""
        last, added, _ = await self._call(self._position(keys=[self._changes]))
        return str(last), int(added)

    async def changes(self, after: str, consumed: int, block_ms: int, count: int = 1000) -> Changes:
        """What changed after ``after``, waiting up to ``block_ms`` for something to.
        ``consumed``: entries ever added up to ``after`` (``position``, plus what was read
        since). Trimming drops the oldest entries, so entries were lost unread exactly when
        more were trimmed than were consumed."""
        _, added, length = await self._call(self._position(keys=[self._changes]))
        if int(added) - int(length) > consumed:
            return Changes(after, {}, gap=True)
        read = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            await self._call(
                self._redis.xread({self._changes: after}, count=count, block=block_ms)
            ),
        )
        keys: dict[str, set[str]] = {}
        last, n = after, 0
        for _, entries in read or []:
            for entry_id, fields in entries:
                keys.setdefault(fields.get("k", ""), set()).add(fields.get("key", ""))
                last, n = entry_id, n + 1
        return Changes(last, keys, read=n)

    async def fetch(
        self, keys: Mapping[str, set[str]]
    ) -> tuple[
        dict[str, Policy | None],
        dict[tuple[str, str], InstanceRecord | None],
        dict[str, TokenRecord | None],
        dict[tuple[str, str], Health],
        dict[str, frozenset[str] | None],
        dict[str, str | None],
    ]:
        """The current values of changed keys (None: gone), in one round trip."""
        kinds = [
            ("p", self._policies),
            ("i", self._instances),
            ("t", self._tokens),
            ("t", self._used),
            ("h", self._health),
            ("g", self._grants),
            ("b", self._bundle),
        ]
        wanted = [(kind, name, sorted(keys.get(kind, ()))) for kind, name in kinds]
        values = await self._transaction(
            *(("HMGET", name, *(fields or ["-"])) for _, name, fields in wanted)
        )
        found = [
            dict(zip(fields, v, strict=False))
            for (_, _, fields), v in zip(wanted, values, strict=True)
        ]
        policies, instances, tokens, used, health, grants, bundle = found
        return (
            {k: None if v is None else self._policy(k, v) for k, v in policies.items()},
            {_split(k): None if v is None else self._instance(k, v) for k, v in instances.items()},
            {k: None if v is None else self._token(k, v, used.get(k)) for k, v in tokens.items()},
            {_split(k): Health.decode(v) for k, v in health.items()},
            {k: None if v is None else _services(v) for k, v in grants.items()},
            bundle,
        )

    async def load_health(self) -> dict[tuple[str, str], Health]:
        values = await self._hgetall(self._health)
        return {_split(key): Health.decode(value) for key, value in values.items()}

    async def put_liveness(
        self, seen: Mapping[tuple[str, str], float], health: Mapping[tuple[str, str], Health]
    ) -> None:
        """A replica's batch: when it last heard from instances, and the health changes it
        saw (a stream that closed, an app that turned sick, an instance that came back); for
        instances still registered (a late batch must not bring a removed one back)."""
        if not seen and not health:
            return
        argv: list[Any] = [len(seen)]
        argv += [x for key, when in seen.items() for x in (_key(*key), repr(when))]
        argv += [x for key, value in health.items() for x in (_key(*key), value.encode())]
        argv.append(CHANGES_KEPT)
        keys = [self._instances, self._seen, self._health, self._changes]
        await self._call(self._share(keys=keys, args=argv))

    async def load_seen(self) -> dict[tuple[str, str], float]:
        values = await self._hgetall(self._seen)
        return {_split(key): float(when) for key, when in values.items()}

    async def _hgetall(self, name: str) -> dict[str, str]:
        return cast(dict[str, str], await self._call(self._redis.hgetall(name)))

    async def put_sidecars(
        self, replica: str, sidecars: list[dict[str, object]], until: float
    ) -> None:
        """The sidecars connected to ``replica``, good until ``until`` (wall clock): a replica
        that dies stops being listed then."""
        document = _dumps({"until": until, "sidecars": sidecars})
        await self._call(self._redis.hset(self._sidecars, replica, document))

    async def load_sidecars(self, now: float) -> dict[str, list[dict[str, object]]]:
        """Every live replica's sidecars; the lists of replicas gone quiet are dropped."""
        lists = await self._hgetall(self._sidecars)
        live, dead = {}, []
        for replica, document in lists.items():
            try:
                entry = json.loads(document)
                fresh, sidecars = entry["until"] >= now, entry["sidecars"]
            except (ValueError, KeyError, TypeError):
                fresh, sidecars = False, []  # not a replica's: dropped too
            if fresh:
                live[replica] = sidecars
            else:
                dead.append(replica)
        if dead:
            await self._call(self._redis.hdel(self._sidecars, *dead))
        return live

    async def claim_table_version(
        self, digest: str, lapsed: frozenset[tuple[str, str]], built: float
    ) -> tuple[int, float]:
        """The version every replica gives a table with this content, and when it was first
        built: the current one if the last table had the same digest, else the next."""
        argv = [digest, repr(built), _dumps(sorted(lapsed))]
        version, when = await self._call(self._claim(keys=[self._meta], args=argv))
        return int(version), float(when)

    async def acquire_lease(self, holder: str, ttl_ms: int) -> Fence | None:
        token = await self._call(
            self._acquire(keys=[self._lease, self._fence], args=[holder, ttl_ms])
        )
        return None if token is None else Fence(holder, int(token))

    async def renew_lease(self, fence: Fence, ttl_ms: int) -> bool:
        return bool(await self._call(self._renew(keys=[self._lease], args=[fence.holder, ttl_ms])))

    async def release_lease(self, fence: Fence) -> None:
        await self._call(self._release(keys=[self._lease], args=[fence.holder]))

    async def expire_fenced(
        self,
        fence: Fence,
        removed: Sequence[tuple[str, str]],
        health: Mapping[tuple[str, str], Health],
    ) -> bool:
        """The reaper's writes, only while ``fence`` still holds the lease: False (nothing
        written) when it does not."""
        argv: list[Any] = [fence.holder, str(fence.token), len(removed)]
        argv += [_key(*key) for key in removed]
        argv += [x for key, value in health.items() for x in (_key(*key), value.encode())]
        argv.append(CHANGES_KEPT)
        keys = [self._lease, self._fence, self._instances, self._health, self._seen]
        done = await self._call(self._expire(keys=[*keys, self._changes], args=argv))
        return bool(done)

    def __repr__(self) -> str:
        return f"<RedisStore {self.url} prefix={self.prefix!r}>"


def _password() -> str | None:
    """From ``MESHLET_REDIS_PASSWORD`` or the file ``MESHLET_REDIS_PASSWORD_FILE`` names (a
    Kubernetes secret mounted as a file), its trailing newline dropped."""
    password = os.environ.get(PASSWORD_ENV)
    path = os.environ.get(PASSWORD_FILE_ENV)
    if password and path:
        raise ConfigError("store", f"set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("store", f"cannot read {PASSWORD_FILE_ENV} {path}: {e}") from None
    return password or None
