from __future__ import annotations

from tests.integration.helpers import OUTPUT, consumer_settled, ensure_input, feed, payloads, read_all, wait_count
from tests.sequin import body


async def test_one_message_end_to_end(js, start_service) -> None:
    await ensure_input(js)
    svc = start_service()
    await feed(js, "cdc.acme.messages", body("messages"))
    assert await wait_count(js, OUTPUT, 1) == 1
    out = await read_all(js, OUTPUT)
    assert out[0].subject == "wa.acme.agent-1.messages.chat-1"
    print(payloads(out))
    info = await consumer_settled(js)
    assert info.num_ack_pending == 0
    print(svc.output()[-3000:])
