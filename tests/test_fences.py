"""What relay/_aiormq.py and relay/_aiohttp.py rely on of aiormq's and aiohttp's internals is still
there, with the same meaning: checked on freshly built library objects, without a broker, in
milliseconds. A failure names the dependency, its installed version and what moved; raise the
bound in pyproject.toml only when these and the broker tests pass on the new release."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import inspect
from collections.abc import MutableMapping
from typing import Any

import aiormq
import pytest
from aiohttp import web, web_response
from aiohttp.abc import AbstractStreamWriter
from aiormq.abc import ChannelFrame
from aiormq.exceptions import DeliveryError, PublishError
from pamqp.body import ContentBody
from pamqp.commands import Basic, Connection
from pamqp.header import ContentHeader

from relay import _aiohttp, _aiormq, amqp
from relay.ingress import LimitedSite

FRAME_MAX = 4096


def moved(library: str, what: str) -> str:
    version = importlib.metadata.version(library)
    return f"{library} {version}: {what} (relay/_{library.replace('-', '_')}.py relies on it)"


# --- aiormq -----------------------------------------------------------------------------------


@pytest.fixture
async def channel() -> aiormq.Channel:
    """A channel as aiormq builds it once the connection is tuned; no socket is opened."""
    connection = aiormq.Connection("amqp://guest:guest@127.0.0.1:1/never-connected")
    connection.connection_tune = Connection.Tune(frame_max=FRAME_MAX)  # what the handshake sets
    connection.server_properties = {"capabilities": {"publisher_confirms": True}}
    try:
        channel = aiormq.Channel(connection, 1, publisher_confirms=True, on_return_raises=True)
    except Exception as exc:
        pytest.fail(moved("aiormq", f"Channel(connection, number, ...) fails: {exc!r}"))
    return channel


async def test_an_aiormq_channel_has_the_bookkeeping_relay_publishes_into(
    channel: aiormq.Channel,
) -> None:
    expected: dict[str, Any] = {
        "delivery_tag": int,
        "confirmations": MutableMapping,
        "message_id_delivery_tag": MutableMapping,
        "write_queue": asyncio.Queue,
        "max_content_size": int,
        "number": int,
    }
    for name, kind in expected.items():
        assert isinstance(getattr(channel, name, None), kind), moved(
            "aiormq", f"Channel.{name} is gone or no longer a {kind.__name__}"
        )
    assert channel.delivery_tag == 0, moved("aiormq", "a new Channel's delivery_tag is not 0")
    assert channel.write_queue is channel.connection.write_queue, moved(
        "aiormq", "Channel.write_queue is not its connection's write queue"
    )
    assert isinstance(getattr(aiormq.Channel, "CONTENT_FRAME_SIZE", None), int), moved(
        "aiormq", "Channel.CONTENT_FRAME_SIZE is gone"
    )
    assert aiormq.Channel.CONTENT_FRAME_SIZE == amqp.FRAME_OVERHEAD
    assert _aiormq.frame_max(channel) == FRAME_MAX, moved(
        "aiormq", "Channel.max_content_size is no longer frame_max - CONTENT_FRAME_SIZE"
    )
    assert isinstance(channel.create_future(), asyncio.Future), moved(
        "aiormq", "Channel.create_future() returns no asyncio.Future"
    )


def test_an_aiormq_channel_frame_is_a_payload_for_the_writer() -> None:
    fields = {f.name for f in dataclasses.fields(ChannelFrame)}
    assert {"payload", "should_close"} <= fields, moved("aiormq", f"ChannelFrame fields {fields}")

    item = _aiormq.frames(b"\x01")

    assert (item.payload, item.should_close, item.drain_future) == (b"\x01", False, None)


def test_aiormq_numbers_its_own_publishes_where_relay_does() -> None:
    source = inspect.getsource(aiormq.Channel.basic_publish)

    for line in ("self.delivery_tag += 1", "self.confirmations[", "self.message_id_delivery_tag["):
        assert line in source, moved("aiormq", f"basic_publish no longer does {line!r}")


async def test_aiormq_resolves_what_relay_registers(channel: aiormq.Channel) -> None:
    """The broker's ack, nack and return, handed to the channel as its reader does."""
    acked, ack_tag = _aiormq.expect_confirm(channel, "m-1")
    nacked, nack_tag = _aiormq.expect_confirm(channel, "m-2")
    returned, return_tag = _aiormq.expect_confirm(channel, "m-3")
    assert (ack_tag, nack_tag, return_tag) == (1, 2, 3)

    await channel._on_confirm_frame(Basic.Ack(delivery_tag=ack_tag))
    await channel._on_confirm_frame(Basic.Nack(delivery_tag=nack_tag))
    properties = Basic.Properties(message_id="m-3")
    channel.frames.put_nowait((0, ContentHeader(0, 2, properties)))
    channel.frames.put_nowait((0, ContentBody(b"{}")))
    await channel._on_return_frame(
        Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="k")
    )

    assert isinstance(acked.result(), Basic.Ack), moved("aiormq", "an ack resolves nothing")
    with pytest.raises(DeliveryError):
        nacked.result()
    with pytest.raises(PublishError):
        returned.result()
    _aiormq.forget_return(channel, "m-3", return_tag)
    assert "m-3" not in channel.message_id_delivery_tag


async def test_a_forgotten_confirm_is_not_resolved(channel: aiormq.Channel) -> None:
    confirmation, tag = _aiormq.expect_confirm(channel, "m-1")

    _aiormq.forget_confirm(channel, tag)
    await channel._on_confirm_frame(Basic.Ack(delivery_tag=tag))

    assert not confirmation.done()


# --- aiohttp ----------------------------------------------------------------------------------


def test_aiohttp_names_its_server_in_a_module_global() -> None:
    assert isinstance(getattr(web_response, "SERVER_SOFTWARE", None), str), moved(
        "aiohttp", "aiohttp.web_response.SERVER_SOFTWARE is gone"
    )
    assert "output_size" in inspect.get_annotations(AbstractStreamWriter), moved(
        "aiohttp", "AbstractStreamWriter.output_size is gone"
    )


async def test_an_aiohttp_tcp_site_has_the_fields_relay_starts_it_with() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, reuse_port=True)

        fields = {
            "_runner": runner,
            "_host": "127.0.0.1",
            "_port": 0,
            "_reuse_port": True,
            "_server": None,
            "_bound_port": None,
        }
        for name, value in fields.items():
            assert getattr(site, name, "(missing)") == value, moved(
                "aiohttp", f"TCPSite.{name} is gone or no longer {value!r} when built"
            )
        site._bound_port = 1234
        assert site.port == 1234, moved("aiohttp", "TCPSite.port does not read _bound_port")
    finally:
        await runner.cleanup()


async def test_a_limited_site_serves_names_relay_and_refuses_over_its_limit() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def expect(request: web.Request) -> None:
        await _aiohttp.send_continue(request)

    app = web.Application()
    app.router.add_post("/", hello, expect_handler=expect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", 0, max_connections=1)
    try:
        await site.start()
        assert site.port != 0

        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nServer: relay\r\n" in answer  # relay.ingress named it (imported above)

        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", site.port)
        assert (await other_reader.read()).startswith(b"HTTP/1.1 503 ")
        other_writer.close()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    finally:
        await runner.cleanup()


async def test_aiormq_hands_the_brokers_blocks_to_the_handlers_relay_wraps() -> None:
    # Given an aiormq connection (never connected) that relay follows the blocks of
    connection = aiormq.Connection("amqp://guest:guest@127.0.0.1:1/never-connected")
    assert connection._client_properties()["capabilities"].get("connection.blocked") is True, moved(
        "aiormq", "no longer advertises the connection.blocked capability"
    )
    source = inspect.getsource(aiormq.Connection)
    for handler in ("__handle_connection_blocked(frame)", "__handle_connection_unblocked(frame)"):
        assert f"self.{handler}" in source, moved("aiormq", f"its reader no longer calls {handler}")
    changes: list[str | None] = []
    _aiormq.on_blocked(connection, changes.append)
    connection.connected.set()  # as its reader does when it starts

    # When the reader hands it Connection.Blocked, then Connection.Unblocked
    await getattr(connection, _aiormq.BLOCKED_HANDLER)(Connection.Blocked(reason="low on memory"))
    waiting = asyncio.ensure_future(connection.ready())
    await asyncio.sleep(0)
    waited = not waiting.done()
    await getattr(connection, _aiormq.UNBLOCKED_HANDLER)(Connection.Unblocked())

    # Then relay heard both, with the broker's reason, and aiormq still did its own part:
    # ready() (which opening a channel awaits) waited while blocked, and returns once unblocked
    assert changes == ["low on memory", None]
    assert waited, moved("aiormq", "ready() no longer waits while blocked")
    await asyncio.wait_for(waiting, 1)
