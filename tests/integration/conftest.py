"""Fixtures with real servers: one nats-server (JetStream) and one redis-server per test session, emptied before
each test; ``python -m cdc_service`` processes started per test and stopped by pid."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.servers import NatsServer, RedisServer, ServiceProcess


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def nats_server(workdir: Path) -> Iterator[NatsServer]:
    # Its own session: test_readiness_fails_while_nats_server_is_frozen SIGSTOPs it, and a shell that exits while
    # a stopped process is in its process group sends that group SIGHUP and SIGCONT (docs/developer_guide.md).
    server = NatsServer(workdir, new_session=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
async def nc(nats_server: NatsServer, redis_server: RedisServer) -> AsyncIterator[Client]:
    """A test-side connection; every stream is deleted and Redis emptied first, so each test starts clean."""
    if not nats_server.alive():
        nats_server.start()
    if not redis_server.alive():
        redis_server.start()
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    for name in await js.streams_info():
        await js.delete_stream(name.config.name)
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    yield client
    await client.close()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
def start_service(
    workdir: Path, nats_server: NatsServer, redis_server: RedisServer
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``python -m cdc_service`` with setting overrides (dotted names); all are stopped at teardown.
    ``new_session=True`` for a replica the test freezes (see ``ServiceProcess``)."""
    started: list[ServiceProcess] = []

    def start(*, wait: bool = True, name: str = "svc", new_session: bool = False, **overrides: Any) -> ServiceProcess:
        service = ServiceProcess(
            workdir, nats_server.url, redis_server.url, name=name, new_session=new_session, **overrides
        )
        service.start()
        started.append(service)
        if wait:
            service.wait_ready()
        return service

    yield start
    for service in started:
        service.stop()
