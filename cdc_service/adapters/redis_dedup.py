"""Redis dedup markers and claims: one round trip per batch to look up and claim, one to mark. Fails open.

One key per event, ``<prefix><event_id>``, in one of two states: a claim (``claim:<replica token>``, expiring after
``dedup.claim_ttl``) says "a replica is publishing this right now"; the marker (the empty string, ``dedup.ttl``)
says "published". The marker is written only after JetStream acknowledged the publish (see
docs/system_architecture.md): a marker written before would make a failed publish look like a duplicate on
redelivery and lose the event. A claim never makes anyone ack: a replica that finds another's claim waits and looks
again. While Redis is unreachable the calls return at once for ``retry_interval`` seconds instead of waiting on a
dead socket for every batch; JetStream's ``Nats-Msg-Id`` window still deduplicates meanwhile.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from cdc_service.config import DedupSettings, RedisSettings, mask_url
from cdc_service.ports import Claim

log = logging.getLogger("cdc_service.redis")

# RedisClusterException ("cannot be connected", raised when no cluster node answers) is not a RedisError.
_ERRORS = (redis.RedisError, RedisClusterException)

# One SET per key in a single script call: about 1 us of Python per key instead of ~10 us for a pipelined SET.
_MARK_SCRIPT = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, '', 'EX', ARGV[1])
end
return #KEYS
"""

CLAIM_PREFIX = b"claim:"

# Look up and claim a batch atomically per key: 0 done (the marker, or any value that is not a claim), 1 claimed by
# this call or already ours (its TTL renewed), 2 another replica's claim.
_CLAIM_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  elseif v == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  elseif string.sub(v, 1, 6) == 'claim:' then
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""

# Compare and delete: only our own claim goes; a marker written meanwhile, or another replica's claim, stays.
_RELEASE_SCRIPT = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('DEL', key)
  end
end
return n
"""
_STATES = (Claim.DONE, Claim.CLAIMED, Claim.HELD)


def _is_marker(value: bytes | None) -> bool:
    return value is not None and not value.startswith(CLAIM_PREFIX)


class RedisHealth:
    """Whether Redis answers and takes writes, from the outcome of each call; thread-safe. After a failure, calls
    skip Redis for ``retry_interval`` seconds rather than wait on a dead socket for every batch. Logs the first
    failure and the recovery; ``on_error(operation)`` counts every failed or skipped call."""

    def __init__(self, url: str, retry_interval: float, on_error: Callable[[str], None] | None) -> None:
        self._url = url
        self._retry_interval = retry_interval
        self._on_error = on_error
        self._retry_at = 0.0  # while Redis is down, calls before this time skip it
        self._was_down = False
        # A read-only replica or a full Redis (noeviction) answers reads and refuses writes: only a write that
        # succeeds clears this, never a read.
        self._write_problem: str | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return not self._was_down and self._write_problem is None

    @property
    def problem(self) -> str | None:
        if self._write_problem is not None:
            return f"writes fail ({self._write_problem}); markers are not stored"
        if self._was_down:
            return "unreachable; deduplicating with JetStream's window only"
        return None

    def skip(self, operation: str | None = None) -> bool:
        """True while Redis is down and its retry time has not come; a skipped ``operation`` counts as an error."""
        skipping = self._was_down and time.monotonic() < self._retry_at
        if skipping and operation is not None and self._on_error:
            self._on_error(operation)
        return skipping

    def failed(self, what: str, exc: Exception, *, write: bool = False) -> None:
        # Only a write the server answered with a refusal (READONLY, OOM, an ACL) is a write problem; a lost
        # connection or a wrong password is an outage, cleared by any call that succeeds.
        write = write and isinstance(exc, redis.ResponseError)
        with self._lock:
            self._retry_at = time.monotonic() + self._retry_interval
            first = not self._was_down and (not write or self._write_problem is None)
            self._was_down = True
            if write:
                self._write_problem = f"{what}: {type(exc).__name__}: {exc}"[:300]
        if first:
            log.warning(
                "redis refuses writes, markers are not stored; deduplicating with JetStream's window only"
                if write
                else "redis unavailable, deduplicating with JetStream's window only",
                extra={"operation": what, "error": f"{type(exc).__name__}: {exc}"[:300], "redis_url": self._url},
            )
        if self._on_error:
            self._on_error(what)

    def succeeded(self, *, write: bool = False) -> None:
        if self._was_down or (write and self._write_problem is not None):
            with self._lock:
                recovered = self._was_down and (write or self._write_problem is None)
                self._was_down = False
                if write:
                    self._write_problem = None
            if recovered:
                log.info("redis reachable again", extra={"redis_url": self._url, "writes": write})


class RedisDedupStore:
    """``DedupStore`` on Redis (standalone or cluster). Thread-safe: workers share one client and its pool."""

    def __init__(
        self,
        redis_settings: RedisSettings,
        dedup_settings: DedupSettings,
        *,
        pool_size: int,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._prefix = dedup_settings.key_prefix
        self._ttl = dedup_settings.ttl
        self._claim_ms = int(dedup_settings.claim_ttl * 1000)
        # One token per process: a claim found with it is this replica's own (a copy in flight here, or a retried
        # call whose first reply was lost), never another's. Host and pid tell an operator who holds a key.
        self.token = CLAIM_PREFIX + f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}".encode()
        self._routing_prefix = dedup_settings.routing_key_prefix
        self._routing_ttl = dedup_settings.routing_ttl
        self._cluster = redis_settings.mode == "cluster"
        self._health = RedisHealth(mask_url(redis_settings.url), redis_settings.retry_interval, on_error)
        self._probe_key = f"{self._prefix}__probe__"
        self._lock = threading.Lock()
        common: dict[str, Any] = {
            "socket_timeout": redis_settings.socket_timeout,
            "socket_connect_timeout": redis_settings.socket_timeout,
            # Reads and SET EX are idempotent, so one quick retry is safe; more would only stall a batch.
            "retry": Retry(NoBackoff(), 1),
        }
        if redis_settings.password:
            common["password"] = redis_settings.password
        if redis_settings.tls_ca_file:  # validation allows it with rediss:// only, where redis-py takes it
            common["ssl_ca_certs"] = redis_settings.tls_ca_file
        self._client: Any = None
        self._script: Any = None
        self._claim_script: Any = None
        self._release_script: Any = None
        if self._cluster:
            # redis-py's cluster client connects as soon as it is built; build it on first use instead, so an
            # unreachable cluster at start-up fails open like a standalone Redis rather than stopping the service.
            self._cluster_args = (redis_settings.url, common)
        else:
            self._client = redis.Redis.from_url(
                redis_settings.url, max_connections=pool_size + 4, health_check_interval=30, **common
            )
            self._script = self._client.register_script(_MARK_SCRIPT)
            self._claim_script = self._client.register_script(_CLAIM_SCRIPT)
            self._release_script = self._client.register_script(_RELEASE_SCRIPT)

    def _cluster_client(self) -> Any:
        with self._lock:
            if self._client is None:
                url, common = self._cluster_args
                self._client = redis.RedisCluster.from_url(url, **common)
            return self._client

    @property
    def available(self) -> bool:
        """False from a failure until a call (or ``probe``) succeeds again, and from a failed write until a write
        succeeds again."""
        return self._health.available

    @property
    def problem(self) -> str | None:
        """What fails, naming the operation (``mark``, ``probe``, ``lookup``); None while all works."""
        return self._health.problem

    def seen(self, event_ids: Sequence[str]) -> list[bool] | None:
        values = self._get_many([self._prefix + event_id for event_id in event_ids], "lookup")
        return None if values is None else [_is_marker(v) for v in values]

    def _get_many(self, keys: list[str], operation: str) -> list[Any] | None:
        """The values of ``keys`` in one round trip (``MGET``; a pipeline of ``GET`` on a cluster, whose keys span
        slots), or None when Redis is skipped or fails: the caller fails open."""
        if not keys:
            return []
        if self._health.skip(operation):
            return None
        try:
            if self._cluster:
                pipe = self._cluster_client().pipeline()
                for key in keys:
                    pipe.get(key)
                values: list[Any] = pipe.execute()
            else:
                values = self._client.mget(keys)
        except _ERRORS as exc:
            self._health.failed(operation, exc)
            return None
        self._health.succeeded()
        return values

    def claim(self, event_ids: Sequence[str]) -> list[Claim] | None:
        if not event_ids:
            return []
        if self._claim_ms <= 0:
            seen = self.seen(event_ids)
            return None if seen is None else [Claim.DONE if s else Claim.FREE for s in seen]
        if self._health.skip("lookup"):
            return None
        keys = [self._prefix + event_id for event_id in event_ids]
        try:
            if self._cluster:
                states = self._claim_cluster(keys)
            else:
                states = [_STATES[int(v)] for v in self._claim_script(keys=keys, args=[self.token, self._claim_ms])]
        except _ERRORS as exc:
            self._health.failed("lookup", exc, write=True)  # the lookup takes claims: a refused write shows here first
            return None
        self._health.succeeded(write=True)
        return states

    def _claim_cluster(self, keys: list[str]) -> list[Claim]:
        """A batch spans many slots, and a script only one: per key ``SET NX PX`` and ``GET`` in one pipeline (each
        key's pair goes to its node in order, so the GET reads the state after our SET)."""
        client = self._cluster_client()
        pipe = client.pipeline()
        for key in keys:
            pipe.set(key, self.token, nx=True, px=self._claim_ms)
            pipe.get(key)
        replies = pipe.execute()
        states: list[Claim] = []
        renew: list[str] = []
        for key, created, value in zip(keys, replies[0::2], replies[1::2], strict=True):
            if created or value == self.token:
                states.append(Claim.CLAIMED)
                if not created:
                    renew.append(key)
            elif value is None or value.startswith(CLAIM_PREFIX):
                states.append(Claim.HELD)  # another's claim; or one that vanished between the two: look again
            else:
                states.append(Claim.DONE)
        if renew:  # rare: a second copy in flight here; keep our claim alive for its attempt too
            pipe = client.pipeline()
            for key in renew:
                pipe.pexpire(key, self._claim_ms)
            pipe.execute()
        return states

    def release(self, event_ids: Sequence[str]) -> None:
        if not event_ids or self._claim_ms <= 0 or self._health.skip():
            return
        keys = [self._prefix + event_id for event_id in event_ids]
        try:
            if self._cluster:
                # Rare (a publish failed for good): one script call per key, since a script sees only one slot.
                client = self._cluster_client()
                script = client.register_script(_RELEASE_SCRIPT)
                for key in keys:
                    script(keys=[key], args=[self.token])
            else:
                self._release_script(keys=keys, args=[self.token])
        except _ERRORS as exc:
            self._health.failed("release", exc)  # the claims expire on their own
            return
        self._health.succeeded()

    def mark(self, event_ids: Sequence[str]) -> bool:
        if not event_ids:
            return True
        if self._health.skip("mark"):
            return False
        keys = [self._prefix + event_id for event_id in event_ids]
        try:
            if self._script is not None:
                self._script(keys=keys, args=[self._ttl])
            else:
                pipe = self._cluster_client().pipeline()
                for key in keys:
                    pipe.set(key, b"", ex=self._ttl)
                pipe.execute()
        except _ERRORS as exc:
            self._health.failed("mark", exc, write=True)
            return False
        self._health.succeeded(write=True)
        return True

    def routes(self, keys: Sequence[str]) -> list[str | None] | None:
        values = self._get_many([self._routing_prefix + key for key in keys], "routing_lookup")
        return None if values is None else [None if v is None else v.decode() for v in values]

    def remember_routes(self, entries: Sequence[tuple[str, str]]) -> bool:
        if not entries:
            return True
        if self._health.skip("routing_mark"):
            return False
        try:
            client = self._cluster_client() if self._cluster else self._client
            pipe = client.pipeline(transaction=False)
            for key, value in entries:
                pipe.set(self._routing_prefix + key, value, ex=self._routing_ttl)
            pipe.execute()
        except _ERRORS as exc:
            self._health.failed("routing_mark", exc)
            return False
        self._health.succeeded()
        return True

    def probe(self) -> bool:
        """Write a short-lived probe key so readiness reflects an outage (or its end) even while no events flow.

        A write, not a PING: a read-only replica or a Redis out of memory under ``noeviction`` answers PING and
        reads while refusing every marker.
        """
        try:
            (self._cluster_client() if self._cluster else self._client).set(self._probe_key, b"", ex=10)
        except _ERRORS as exc:
            self._health.failed("probe", exc, write=True)
            return False
        self._health.succeeded(write=True)
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
