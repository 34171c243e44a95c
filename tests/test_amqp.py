"""relay's own encoding of a publish (relay/amqp.py) is byte for byte what pamqp marshals: for
the shapes relay publishes, and (hypothesis) for any names, ids, string headers and bodies of 0 to 3
frames."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from relay.amqp import Publish

HEADERS = {"x-relay-source": "envoice", "x-relay-event": "paid", "x-relay-key": "invoice:42",
           "relay-bucket": "17", "x-unicode": "Zürich €"}  # fmt: skip


def pamqp_frames(
    channel: int,
    frame_max: int,
    body: bytes,
    *,
    exchange: str = "relay.activities",
    routing_key: str,
    message_id: str,
    timestamp: int,
    headers: Mapping[str, str] = HEADERS,
) -> bytes:
    properties = Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
        timestamp=datetime.fromtimestamp(timestamp, UTC),
        headers=dict(headers),
    )
    chunk = frame_max - 8
    frames: list[Basic.Publish | ContentHeader | ContentBody] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
        ContentHeader(0, len(body), properties),
        *(ContentBody(body[i : i + chunk]) for i in range(0, len(body), chunk)),
    ]  # fmt: skip
    return b"".join(pamqp_frame.marshal(f, channel) for f in frames)


@pytest.mark.parametrize(
    ("channel", "frame_max", "body"),
    [(1, 131072, b'{"id":"envoice:1"}'), (7, 4096, b"x" * 10_000), (1, 4096, b"y" * 4088)],
)
def test_publish_frames_are_what_pamqp_marshals(channel: int, frame_max: int, body: bytes) -> None:
    ours = Publish(channel, frame_max, "relay.activities").frames(
        body, routing_key="envoice.paid", message_id="envoice:9001", timestamp=1764590400,
        headers=HEADERS,
    )  # fmt: skip

    assert ours == pamqp_frames(
        channel, frame_max, body, routing_key="envoice.paid", message_id="envoice:9001",
        timestamp=1764590400,
    )  # fmt: skip


def test_a_name_too_long_for_amqp_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        Publish(1, 4096, "x").frames(
            b"{}", routing_key="a" * 256, message_id="m", timestamp=0, headers={}
        )


# What an AMQP short string holds (names, keys, ids): at most 255 bytes, 4 to a character at most.
SHORT = st.text(max_size=63)
NAME = st.text(max_size=32)  # a table's field names: pamqp cuts them at 128 bytes, as AMQP says
EXCHANGE = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:", max_size=127
)


@given(
    channel=st.integers(1, 65535),
    chunk=st.integers(1, 64),  # a small frame_max: bodies of several frames
    frames=st.integers(0, 3),
    data=st.data(),
    exchange=EXCHANGE,
    routing_key=SHORT,
    message_id=SHORT.filter(bool),  # relay's are "source:id"; pamqp leaves an empty one out
    timestamp=st.integers(0, 4_102_444_800),  # to 2100
    headers=st.dictionaries(NAME, st.text(max_size=100), max_size=6),
)
def test_any_publish_is_what_pamqp_marshals(
    channel: int,
    chunk: int,
    frames: int,
    data: st.DataObject,
    exchange: str,
    routing_key: str,
    message_id: str,
    timestamp: int,
    headers: dict[str, str],
) -> None:
    """Relay's headers are all strings (relay.wire.webhook_headers): the encoder writes no other."""
    low = (frames - 1) * chunk + 1 if frames else 0  # exactly `frames` body frames
    body = data.draw(st.binary(min_size=low, max_size=frames * chunk), label="body")
    ours = Publish(channel, chunk + 8, exchange).frames(
        body, routing_key=routing_key, message_id=message_id, timestamp=timestamp, headers=headers
    )

    assert ours == pamqp_frames(
        channel, chunk + 8, body, exchange=exchange, routing_key=routing_key,
        message_id=message_id, timestamp=timestamp, headers=headers,
    )  # fmt: skip
