"""A store in Redis (``redis.asyncio``), which several control-plane replicas can share.

Every key starts with a prefix (``meshlet:`` unless ``?prefix=`` says otherwise), so one Redis
database can hold several meshes:

    {p}meta          hash   epoch, table_version, table_digest, table_built, lapsed (JSON)
    {p}policies      hash   service -> policy document (JSON)
    {p}instances     hash   "service/id" -> instance record (JSON)
    {p}tokens        hash   token id -> token record without its last use (JSON)
    {p}token-used    hash   token id -> when it was last used (a float's repr)
    {p}probe         string the readiness probe's write

Each call is one round trip: a single command, a ``MULTI``/``EXEC`` pipeline, or a Lua script
where a write depends on what is there. A call that cannot reach Redis within ``TIMEOUT``
raises ``StoreError`` and, Redis being one server, changed nothing or everything of that one
transaction.

The password never travels in the URL (it would show in ``ps`` and in logs): it comes from
``MESHLET_REDIS_PASSWORD`` or the file named by ``MESHLET_REDIS_PASSWORD_FILE``. ``rediss://``
speaks TLS; ``?ssl_ca_certs=PATH`` names the CA bundle the server's certificate must chain to.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control_plane.errors import ConfigError, StoreError
from control_plane.model import InstanceRecord, Origin, TokenRecord
from control_plane.store import Snapshot
from control_plane.wire import Policy, WireError, parse_policy, to_json

T = TypeVar("T")

TIMEOUT = 2.0
"""seconds a connect or a call may take before the store counts as unavailable"""
PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PASSWORD_ENV = "MESHLET_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "MESHLET_REDIS_PASSWORD_FILE"
_QUERY = ("prefix", "ssl_ca_certs")

# touch_tokens: a last use is kept only for a token that is still stored
_TOUCH = """
for i = 1, #ARGV, 2 do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
        redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    end
end
"""


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class RedisStore:
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
        }
        if ssl_ca_certs:
            options["ssl_ca_certs"] = ssl_ca_certs
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url, **options)
        self._touch = self._redis.register_script(_TOUCH)
        p = prefix
        self._meta, self._policies, self._instances = f"{p}meta", f"{p}policies", f"{p}instances"
        self._tokens, self._used, self._probe = f"{p}tokens", f"{p}token-used", f"{p}probe"

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
        try:
            return await call
        except (RedisError, OSError) as e:
            raise StoreError(f"redis {self.url}: {e}") from e

    async def _transaction(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The commands in one MULTI/EXEC: one round trip, all or nothing."""
        pipe = self._redis.pipeline(transaction=True)
        for command in commands:
            pipe.execute_command(*command)
        return await self._call(pipe.execute())

    async def load(self) -> Snapshot:
        _, meta, policies, instances, tokens, used = await self._transaction(
            ("HSETNX", self._meta, "epoch", secrets.token_hex(8)),
            ("HGETALL", self._meta),
            ("HGETALL", self._policies),
            ("HGETALL", self._instances),
            ("HGETALL", self._tokens),
            ("HGETALL", self._used),
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
        )

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

    async def put_policy(self, service: str, policy: Policy) -> None:
        await self._call(self._redis.hset(self._policies, service, _dumps(to_json(policy))))

    async def delete_policy(self, service: str) -> None:
        await self._call(self._redis.hdel(self._policies, service))

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
        }
        key = f"{record.service}/{record.id}"
        await self._call(self._redis.hset(self._instances, key, _dumps(document)))

    async def delete_instances(self, keys: Sequence[tuple[str, str]]) -> None:
        if keys:
            fields = [f"{service}/{instance_id}" for service, instance_id in keys]
            await self._call(self._redis.hdel(self._instances, *fields))

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
            ("HSET", self._tokens, record.id, _dumps(document)), ("HDEL", self._used, record.id)
        )

    async def delete_token(self, token_id: str) -> None:
        await self._transaction(("HDEL", self._tokens, token_id), ("HDEL", self._used, token_id))

    async def touch_tokens(self, used: dict[str, float]) -> None:
        if used:
            argv = [item for token_id, when in used.items() for item in (token_id, repr(when))]
            await self._call(self._touch(keys=[self._tokens, self._used], args=argv))

    async def probe(self) -> None:
        await self._call(self._redis.set(self._probe, repr(time.time())))

    async def close(self) -> None:
        await self._redis.aclose()

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
