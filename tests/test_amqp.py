"""relay's own encoding of a publish (relay/amqp.py) is byte for byte what pamqp marshals."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from relay.amqp import Publish

HEADERS = {"x-relay-source": "envoice", "x-relay-event": "paid", "x-relay-key": "invoice:42",
           "relay-bucket": "17", "x-unicode": "Zürich €"}  # fmt: skip


def pamqp_frames(channel: int, frame_max: int, body: bytes, **fields: object) -> bytes:
    properties = Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=str(fields["message_id"]),
        timestamp=datetime.fromtimestamp(int(str(fields["timestamp"])), UTC),
        headers=dict(HEADERS),
    )
    chunk = frame_max - 8
    frames: list[Basic.Publish | ContentHeader | ContentBody] = [
        Basic.Publish(exchange="relay.activities", routing_key=str(fields["routing_key"]),
                      mandatory=True),
        ContentHeader(0, len(body), properties),
        *(ContentBody(body[i : i + chunk]) for i in range(0, len(body), chunk)),
    ]  # fmt: skip
    return b"".join(pamqp_frame.marshal(f, channel) for f in frames)


@pytest.mark.parametrize(
    ("channel", "frame_max", "body"),
    [(1, 131072, b'{"id":"envoice:1"}'), (7, 4096, b"x" * 10_000), (1, 4096, b"y" * 4088)],
)
def test_publish_frames_are_what_pamqp_marshals(channel: int, frame_max: int, body: bytes) -> None:
    fields = {"routing_key": "envoice.paid", "message_id": "envoice:9001", "timestamp": 1764590400}

    ours = Publish(channel, frame_max, "relay.activities").frames(
        body, routing_key="envoice.paid", message_id="envoice:9001", timestamp=1764590400,
        headers=HEADERS,
    )  # fmt: skip

    assert ours == pamqp_frames(channel, frame_max, body, **fields)


def test_a_name_too_long_for_amqp_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        Publish(1, 4096, "x").frames(
            b"{}", routing_key="a" * 256, message_id="m", timestamp=0, headers={}
        )
