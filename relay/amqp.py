"""The AMQP 0-9-1 frames of one webhook publish, encoded by relay for the ingress's hot path.

aiormq's `basic_publish` builds pamqp objects and marshals them for every message, which cost
the ingress more per request than the rest of publishing. Every publish of the ingress has the
same shape (persistent, mandatory, JSON, a message id, a timestamp and string headers), so
`Publish` encodes its three frames (method, content header, body) directly; tests/test_amqp.py
checks the bytes against pamqp's. The frames go to aiormq's writer like its own
(relay/publisher.py).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

FRAME_METHOD, FRAME_HEADER, FRAME_BODY = 1, 2, 3
FRAME_END = b"\xce"
FRAME_OVERHEAD = 8  # type, channel, size before a frame's payload; the end octet after
BASIC = 60
BASIC_PUBLISH = 40
MANDATORY = 1
PERSISTENT = 2  # delivery mode
# Property flags, in the order properties follow them (AMQP 0-9-1, 4.2.6.1 and basic class)
CONTENT_TYPE, HEADERS, DELIVERY_MODE, MESSAGE_ID, TIMESTAMP = (
    1 << 15,
    1 << 13,
    1 << 12,
    1 << 7,
    1 << 6,
)
JSON = b"application/json"

_FRAME = struct.Struct(">BHI")
_U32 = struct.Struct(">I")


def shortstr(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise ValueError(f"longer than 255 bytes for an AMQP short string: {value[:40]!r}...")
    return bytes((len(encoded),)) + encoded


def table(items: Mapping[str, str]) -> bytes:
    """A field table of long strings (type `S`), as pamqp encodes a dict of str: by name."""
    fields = b"".join(
        shortstr(name) + b"S" + _U32.pack(len(encoded)) + encoded
        for name, value in sorted(items.items())
        for encoded in (value.encode(),)
    )
    return _U32.pack(len(fields)) + fields


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + FRAME_END


class Publish:
    """Encodes publishes to one exchange on one channel of a connection with `frame_max`."""

    def __init__(self, channel: int, frame_max: int, exchange: str) -> None:
        self.channel = channel
        self._method = struct.pack(">HHH", BASIC, BASIC_PUBLISH, 0) + shortstr(exchange)
        self._body_max = frame_max - FRAME_OVERHEAD
        flags = CONTENT_TYPE | HEADERS | DELIVERY_MODE | MESSAGE_ID | TIMESTAMP
        self._flags = struct.pack(">H", flags) + shortstr(JSON.decode())

    def frames(
        self,
        body: bytes,
        *,
        routing_key: str,
        message_id: str,
        timestamp: int,
        headers: Mapping[str, str],
    ) -> bytes:
        """Basic.Publish (mandatory), its content header and its body frames, as one write."""
        method = self._method + shortstr(routing_key) + bytes((MANDATORY,))
        header = (
            struct.pack(">HHQ", BASIC, 0, len(body))
            + self._flags
            + table(headers)
            + bytes((PERSISTENT,))
            + shortstr(message_id)
            + struct.pack(">Q", timestamp)
        )
        parts = [
            frame(FRAME_METHOD, self.channel, method),
            frame(FRAME_HEADER, self.channel, header),
        ]
        for start in range(0, len(body), self._body_max):
            parts.append(frame(FRAME_BODY, self.channel, body[start : start + self._body_max]))
        return b"".join(parts)
