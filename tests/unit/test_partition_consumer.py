"""ensure_partition_consumer retries an update that races a takeover (fake request/reply; the race itself needs a
loaded server and is not reproducible on demand)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from cdc_service.adapters.nats_jetstream import ProvisioningError
from cdc_service.adapters.nats_partitions import ensure_partition_consumer
from cdc_service.config import settings_from_mapping

RACE = {"error": {"code": 500, "err_code": 10012, "description": "open .../meta.inf.tmp: no such file or directory"}}
MISSING = {"error": {"code": 404, "err_code": 10014, "description": "consumer not found"}}


class FakeNats:
    """Answers CONSUMER.INFO with 'not found' and CONSUMER.CREATE with the scripted replies, then success."""

    def __init__(self, create_replies: list[dict[str, Any]]) -> None:
        self.create_replies = create_replies
        self.creates = 0

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        if ".CONSUMER.INFO." in subject:
            return SimpleNamespace(data=orjson.dumps(MISSING))
        self.creates += 1
        reply = self.create_replies.pop(0) if self.create_replies else {"name": "ok"}
        return SimpleNamespace(data=orjson.dumps(reply))


@pytest.fixture
def ingest() -> Any:
    return settings_from_mapping({"ingest": {"ordering": "partitioned", "partitions": 2}}).ingest


@pytest.mark.parametrize("failures", [0, 1, 4])
async def test_an_update_racing_a_takeover_is_retried(ingest: Any, failures: int) -> None:
    nc = FakeNats([RACE] * failures)
    await ensure_partition_consumer(nc, ingest, 0, backoff=0)  # type: ignore[arg-type]
    assert nc.creates == failures + 1


async def test_gives_up_after_the_attempts_naming_the_consumer(ingest: Any) -> None:
    nc = FakeNats([RACE] * 5)
    with pytest.raises(ProvisioningError, match=r"cdc_consumers_p1.*10012"):
        await ensure_partition_consumer(nc, ingest, 1, backoff=0)  # type: ignore[arg-type]
    assert nc.creates == 5
