"""The receive side of the NATS protocol for the two busiest subscriptions: JetStream deliveries and PubAcks.

nats-py hands every received message through a regex parse, a header parse, a ``Msg`` dataclass, a per-subscription
``asyncio.Queue``, a task switch and a callback coroutine. While the service drains a backlog that is two messages
per event (the delivery and its PubAck), and it was about a fifth of all GIL time. Here a subscription may register a
*route*: a plain function the parser calls with the raw parts of each of its messages, on the loop thread, in wire
order, without any of that. A route returns False for a message it does not take (then nats-py's own path gets it).

Loop thread only, like the rest of nats-py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError, ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

# (subject, reply, payload, header block or None) -> taken?
Route = Callable[[bytes, bytes, bytes, "bytes | None"], bool]

_CRLF = b"\r\n"
_HEADER_LINE = b"NATS/1.0"
_STATUS_LEN = 3


class WireParser(Parser):
    """nats-py's parser with a fast path for ``MSG`` and ``HMSG``: each whole message is cut out of the received
    bytes by offsets (one copy of its payload, no regex, no buffer shift per message) and passed to its
    subscription's route, or to ``_process_msg`` as nats-py does. Every other operation (``PING``, ``PONG``,
    ``INFO``, ``+OK``, ``-ERR``) is handed to nats-py's own parser one whole line at a time. A message split across
    reads waits in the buffer until all of it is there (and is not looked at again before then).

    Contract kept from nats-py: messages are dispatched in wire order, one at a time; a malformed ``MSG`` or
    ``HMSG`` line raises ``ProtocolError`` (the client reconnects).
    """

    _wanted = 0  # bytes the buffered message needs in all (0: unknown); a large one arrives in many reads

    def reset(self) -> None:
        super().reset()
        self._wanted = 0

    async def parse(self, data: bytes = b"") -> None:
        if self.state != AWAITING_CONTROL_LINE:  # nats-py is in the middle of a message: let it finish
            await super().parse(data)
            return
        buf = self.buf
        if buf and len(buf) + len(data) < self._wanted:
            buf.extend(data)  # still short of the message at its start: no copy, no second look at its line
            return
        self._wanted = 0
        if buf:
            buf.extend(data)
            data = bytes(buf)
            buf.clear()
        pos = 0
        while True:
            pos, declined = self._dispatch(data, pos)
            if declined is not None:
                sid, subject, reply, payload, header = declined
                # nats-py's own path, past the routes (it takes a missing header block as None, though typed bytes).
                await Client._process_msg(self.nc, sid, subject, reply, payload, header)  # type: ignore[arg-type]
                continue
            eol = data.find(_CRLF, pos)
            if eol < 0 or data.startswith(b"MSG ", pos) or data.startswith(b"HMSG ", pos):
                break  # the rest of a line or of a message is still on its way
            # A whole control line that is not a message (PING, PONG, INFO, +OK, -ERR): nats-py's parser takes it.
            buf.extend(data[pos : eol + 2])
            pos = eol + 2
            await super().parse()
        if pos < len(data):
            buf.extend(data[pos:])

    def _dispatch(self, data: bytes, pos: int) -> tuple[int, tuple[int, bytes, bytes, bytes, bytes | None] | None]:
        """Route every whole MSG/HMSG from ``pos`` on. Returns the offset of the first byte not consumed and, when
        a message has no route or its route declined it, that message (consumed) for nats-py's path."""
        routes: dict[int, Route] = self.nc.routes
        end = len(data)
        taken = taken_bytes = 0
        try:
            while pos < end:
                eol = data.find(_CRLF, pos)
                if eol < 0:
                    break
                if data.startswith(b"MSG ", pos):
                    args = data[pos + 4 : eol].split()
                    header_size = 0
                    if len(args) == 4:
                        subject, sid_text, reply, size_text = args
                    elif len(args) == 3:
                        subject, sid_text, size_text = args
                        reply = b""
                    else:
                        raise ProtocolError("nats: malformed MSG")
                elif data.startswith(b"HMSG ", pos):
                    args = data[pos + 5 : eol].split()
                    if len(args) == 5:
                        subject, sid_text, reply, header_text, size_text = args
                    elif len(args) == 4:
                        subject, sid_text, header_text, size_text = args
                        reply = b""
                    else:
                        raise ProtocolError("nats: malformed MSG")
                    header_size = int(header_text)
                else:
                    break
                size = int(size_text)
                start = eol + 2
                if end < start + size + 2:
                    self._wanted = start + size + 2 - pos
                    break  # the payload is still on its way
                header = data[start : start + header_size] if header_size else None
                payload = data[start + header_size : start + size]
                sid = int(sid_text)
                pos = start + size + 2
                route = routes.get(sid)
                if route is None or not route(subject, reply, payload, header):
                    return pos, (sid, subject, reply, payload, header)
                taken += 1
                taken_bytes += len(payload)
        except ValueError:
            raise ProtocolError("nats: malformed MSG") from None
        finally:
            if taken:
                stats = self.nc.stats
                stats["in_msgs"] += taken
                stats["in_bytes"] += taken_bytes
        return pos, None


def headers_of(block: bytes | None) -> dict[str, str] | None:
    """The headers of a raw ``NATS/1.0`` block as nats-py's ``Client._process_headers`` reads them (an inline status
    becomes ``Status`` and ``Description``; lines are split by ``Client._parse_header_lines``), without its
    coroutine: a delivery's headers are read only where they are used, on a worker thread."""
    if not block:
        return None
    hdr: dict[str, str] | None = None
    raw = block[len(_HEADER_LINE) :]
    if raw[:1] == b" ":
        line = block[len(_HEADER_LINE) + 1 :]
        status = line[:_STATUS_LEN].strip().decode()
        description = line[_STATUS_LEN + 1 : len(line) - 4]
        hdr = {}
        if status.isdigit():
            hdr["Status"] = status
        raw = raw[raw.find(_CRLF) + 2 :]
        if description:
            i = description.find(_CRLF)
            if i > 0:
                hdr["Description"] = description[:i].decode()
                hdr.update(Client._parse_header_lines(description[i + 2 :]))
            else:
                hdr["Description"] = description.decode()
    if not len(raw) > 2:
        return hdr
    parsed = Client._parse_header_lines(block[len(_HEADER_LINE) + 2 :])
    if hdr:
        hdr.update(parsed)
        return hdr
    return parsed


class Delivery:
    """A JetStream delivery taken by a route: what the pipeline reads of a nats-py ``Msg`` (``InboundMessage``),
    with headers and metadata read only when asked for. ``ack`` writes its ready-made command (nats-py's bytes and
    checks, once); ``nak``, ``term`` and ``in_progress`` are nats-py's own, through a ``Msg`` made for the call."""

    __slots__ = (
        "_ackd",
        "_block",
        "_client",
        "_headers",
        "_metadata",
        "_reply",
        "_reply_text",
        "_sid",
        "data",
        "subject",
    )

    def __init__(self, client: Any, sid: int, subject: bytes, reply: bytes, data: bytes, block: bytes | None) -> None:
        self._client = client
        self._sid = sid
        # Not strict UTF-8: see _Client (a stored subject with a byte like 0xff must reach the engine, which
        # dead-letters it, instead of killing the read loop).
        self.subject = subject.decode("utf-8", "surrogateescape")
        self._reply = reply
        self._reply_text = ""
        self.data = data
        self._block = block
        self._headers: Any = _UNREAD
        self._metadata: Any = None
        self._ackd = False

    @property
    def reply(self) -> str:
        text = self._reply_text
        if not text:
            text = self._reply_text = self._reply.decode("utf-8", "surrogateescape")
        return text

    @property
    def headers(self) -> dict[str, str] | None:
        headers = self._headers
        if headers is _UNREAD:
            headers = self._headers = headers_of(self._block)
        return headers  # type: ignore[no-any-return]

    @property
    def metadata(self) -> Msg.Metadata:
        if self._metadata is None:
            self._metadata = self._msg().metadata
        return self._metadata  # type: ignore[no-any-return]

    def _msg(self) -> Msg:
        return Msg(
            _client=self._client,
            subject=self.subject,
            reply=self.reply,
            data=self.data,
            headers=self.headers,
            _sid=self._sid,
        )

    async def ack(self) -> None:
        if self._ackd:
            raise MsgAlreadyAckdError(self)
        await send_command(self._client, b"PUB " + self._reply + b" 0\r\n\r\n")
        self._ackd = True

    async def nak(self, delay: float | None = None) -> None:
        if self._ackd:
            raise MsgAlreadyAckdError(self)
        await self._msg().nak(delay=delay)
        self._ackd = True

    async def term(self) -> None:
        if self._ackd:
            raise MsgAlreadyAckdError(self)
        await self._msg().term()
        self._ackd = True

    async def in_progress(self) -> None:
        if self._ackd:
            raise MsgAlreadyAckdError(self)
        await self._msg().in_progress()

    def __repr__(self) -> str:
        return f"<Delivery subject={self.subject!r} reply={self.reply!r} bytes={len(self.data)}>"


_UNREAD = object()


async def send_command(nc: Client, command: bytes, payload_size: int = 0) -> None:
    """Queue one ready protocol command the way ``nc.publish`` does: the same refusals (closed, draining, buffer full
    while reconnecting, payload too large), then the flusher is woken if it sleeps. Uses nats-py internals, as its
    publish does."""
    if nc._status == _CONNECTED and payload_size <= nc._max_payload:
        # The common case, nats-py's _send_command inlined: connected (so neither closed nor draining).
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
            await nc._flush_pending(force_flush=True)
    else:
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not nc.is_connected and (
            nc._max_pending_size <= 0 or payload_size + nc._pending_data_size > nc._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        if payload_size > nc._max_payload:
            raise nats.errors.MaxPayloadError
        await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


_CONNECTED = Client.CONNECTED
