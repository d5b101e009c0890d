"""Redis dedup markers: one round trip per batch to look up, one to mark. Fails open.

The marker is written only after JetStream acknowledged the publish (see docs/system_architecture.md): a marker
written before would make a failed publish look like a duplicate on redelivery and lose the event. While Redis is
unreachable the calls return at once for ``retry_interval`` seconds instead of waiting on a dead socket for every
batch; JetStream's ``Nats-Msg-Id`` window still deduplicates meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from cdc_service.config import DedupSettings, RedisSettings, mask_url

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
        self._retry_interval = redis_settings.retry_interval
        self._cluster = redis_settings.mode == "cluster"
        self._url = mask_url(redis_settings.url)
        self._on_error = on_error
        self._retry_at = 0.0  # while Redis is down, calls before this time skip it
        self._was_down = False
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
        if self._cluster:
            # redis-py's cluster client connects as soon as it is built; build it on first use instead, so an
            # unreachable cluster at start-up fails open like a standalone Redis rather than stopping the service.
            self._cluster_args = (redis_settings.url, common)
        else:
            self._client = redis.Redis.from_url(
                redis_settings.url, max_connections=pool_size + 4, health_check_interval=30, **common
            )
            self._script = self._client.register_script(_MARK_SCRIPT)

    def _cluster_client(self) -> Any:
        with self._lock:
            if self._client is None:
                url, common = self._cluster_args
                self._client = redis.RedisCluster.from_url(url, **common)
            return self._client

    @property
    def available(self) -> bool:
        """The last call's verdict: False from a failure until a call (or ``probe``) succeeds again."""
        return not self._was_down

    def _skip(self) -> bool:
        return self._was_down and time.monotonic() < self._retry_at

    def _failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + self._retry_interval
            first = not self._was_down
            self._was_down = True
        if first:
            log.warning(
                "redis unavailable, deduplicating with JetStream's window only",
                extra={"operation": what, "error": f"{type(exc).__name__}: {exc}"[:300], "redis_url": self._url},
            )
        if self._on_error:
            self._on_error(what)

    def _succeeded(self) -> None:
        if self._was_down:
            with self._lock:
                recovered, self._was_down = self._was_down, False
            if recovered:
                log.info("redis reachable again", extra={"redis_url": self._url})

    def seen(self, event_ids: Sequence[str]) -> list[bool] | None:
        if not event_ids:
            return []
        if self._skip():
            if self._on_error:
                self._on_error("lookup")
            return None
        keys = [self._prefix + event_id for event_id in event_ids]
        try:
            if self._cluster:
                pipe = self._cluster_client().pipeline()
                for key in keys:
                    pipe.exists(key)
                values = pipe.execute()
                found = [bool(v) for v in values]
            else:
                found = [v is not None for v in self._client.mget(keys)]
        except _ERRORS as exc:
            self._failed("lookup", exc)
            return None
        self._succeeded()
        return found

    def mark(self, event_ids: Sequence[str]) -> bool:
        if not event_ids:
            return True
        if self._skip():
            if self._on_error:
                self._on_error("mark")
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
            self._failed("mark", exc)
            return False
        self._succeeded()
        return True

    def probe(self) -> bool:
        """Ping Redis so readiness reflects an outage (or its end) even while no events flow."""
        try:
            (self._cluster_client() if self._cluster else self._client).ping()
        except _ERRORS as exc:
            self._failed("ping", exc)
            return False
        self._succeeded()
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
