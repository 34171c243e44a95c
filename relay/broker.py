"""Keeping a RabbitMQ connection: connect with backoff, run a session, reconnect when it drops.

relay uses plain connections with this loop instead of aio-pika's robust connection, so that
every reconnect runs the same code as the first connect (declare topology, open channels, start
consumers) and a lost channel is handled like a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import (
    AMQPError,
    ChannelLockedResource,
    ChannelNotFoundEntity,
    InvalidFrameError,
    ProbableAuthenticationError,
)
from pamqp.common import FieldTable

from relay import _aiormq, metrics
from relay.errors import BrokerUnavailable, RelayError
from relay.settings import BrokerSettings, masked

log = structlog.get_logger()

T = TypeVar("T")
MAX_RECONNECT_DELAY = 5.0

BROKER_ERRORS = (AMQPError, OSError, asyncio.TimeoutError, RuntimeError)

Session = Callable[[AbstractConnection, asyncio.Event], Awaitable[None]]


class Blocked:
    """Whether the broker blocks a connection's publishes, and why: RabbitMQ does so to every
    publishing connection while a node is over its memory or disk watermark (a resource alarm),
    and then stops reading the whole connection once it publishes. Each change is logged once,
    with the broker's reason, and exported as relay_broker_blocked{component}."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.reason: str | None = None  # set while blocked
        self._gauge = metrics.BROKER_BLOCKED.labels(component)
        self._gauge.set(0)

    def watch(self, connection: AbstractConnection) -> None:
        """Follow `connection`'s blocks (a new connection starts unblocked)."""
        self.changed(None)
        _aiormq.on_blocked(_aiormq.underlay(connection), self.changed)

    def changed(self, reason: str | None) -> None:
        if reason == self.reason:
            return
        self.reason = reason
        self._gauge.set(reason is not None)
        if reason is not None:
            log.warning("broker blocked publishing", component=self.component, reason=reason)
        else:
            log.info("broker unblocked publishing", component=self.component)


async def keep_connected(
    urls: Sequence[str],
    session: Session,
    *,
    what: str,
    until: asyncio.Event | None = None,
    blocked: Blocked | None = None,
) -> None:
    """Run `session(connection, over)` on each new connection until `until` is set (or cancelled);
    `blocked` follows each connection's blocks by the broker.

    `over` is set when the connection drops; the session may set it too. A session runs until it
    returns, typically after awaiting `over`; then the connection is closed and, unless `until`
    is set, a new one is made. Each connection attempt goes to the next of `urls` (a cluster's
    nodes, starting at a random one so that replicas spread over them); the delay between
    attempts grows only once every node has failed in a row.
    """
    until = until or asyncio.Event()
    delay = 0.2
    turn = random.randrange(len(urls))
    failed = 0  # connection attempts in a row
    while not until.is_set():
        url, turn = urls[turn % len(urls)], turn + 1
        try:
            connection = await aio_pika.connect(url, timeout=5, client_properties=named(what))
        except BROKER_ERRORS as exc:
            failed += 1
            wait = delay if failed % len(urls) == 0 else 0.0
            log.warning("broker unreachable", component=what, broker=masked(url),
                        error=_describe(exc), retry_in=wait)  # fmt: skip
            if wait:
                await until_set(asyncio.sleep(wait), until)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)
            continue
        failed = 0
        over = asyncio.Event()
        connection.close_callbacks.add(lambda *_, over=over: over.set())
        log.info("broker connected", component=what, broker=masked(url))
        if blocked is not None:
            blocked.watch(connection)
        try:
            await session(connection, over)
            delay = 0.2
        except BROKER_ERRORS as exc:  # e.g. a declare refused: back off as for a failed connect
            log.warning("broker session failed", component=what, error=_describe(exc))
            await until_set(asyncio.sleep(delay), until)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)
        finally:
            await asyncio.shield(close_quietly(connection))
            if blocked is not None:
                blocked.changed(None)  # the next connection starts unblocked
        if not until.is_set():
            log.warning("broker connection lost", component=what)


CONNECT_SECONDS = 10.0


async def connect(broker: BrokerSettings) -> AbstractConnection:
    """A connection for a command that needs the broker now, to the first of its nodes that
    answers; if none does, BrokerUnavailable saying why in words an operator can act on."""
    reasons = []
    for url in broker.connection_urls:
        where = masked(url)
        try:
            return await aio_pika.connect(url, timeout=CONNECT_SECONDS)
        except ProbableAuthenticationError:
            raise BrokerUnavailable(
                f"{where} refused the login: check the user and password in broker.url"
            ) from None
        except InvalidFrameError:  # the broker closed the connection while opening it
            raise BrokerUnavailable(
                f"{where} refused vhost {broker.vhost!r}: it does not exist, "
                "or the user may not use it"
            ) from None
        except BROKER_ERRORS as exc:
            reasons.append(f"{where}: {_describe(exc)}")
    raise BrokerUnavailable("; ".join(reasons))


async def until_set(awaitable: Awaitable[T], *events: asyncio.Event) -> T | None:
    """The result of `awaitable`, or None (and `awaitable` cancelled) if an event is set first."""
    task = asyncio.ensure_future(awaitable)
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait([task, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


async def exchange_exists(connection: AbstractConnection, name: str) -> bool:
    """Whether the exchange exists; asked on a channel of its own, which NOT_FOUND closes."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_exchange(name, passive=True)
    except ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def queue_exists(connection: AbstractConnection, name: str) -> bool:
    """Whether the queue exists; asked on a channel of its own, which NOT_FOUND closes."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def take_turn(connection: AbstractConnection, name: str) -> bool:
    """Whether `connection` now holds the turn `name`: an exclusive queue, which one connection
    at a time can have (the broker deletes it when that connection closes, or its node goes).
    Only for turns: exclusive queues are classic queues, never replicated."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(name, exclusive=True, auto_delete=True)
    except ChannelLockedResource:
        return False
    return True


TURN_POLL_SECONDS = 0.5


async def wait_for_turn(
    connection: AbstractConnection, name: str, *, give_up_after: float, what: str
) -> None:
    """Take the turn `name`, waiting while another connection holds it (saying so once, as
    `what`); RelayError after `give_up_after` seconds."""
    deadline = asyncio.get_running_loop().time() + give_up_after
    said = False
    while not await take_turn(connection, name):
        if asyncio.get_running_loop().time() > deadline:
            raise RelayError(f"{what} has held {name} for over {give_up_after:.0f} s")
        if not said:
            log.info(f"waiting for {what} to finish", turn=name)
            said = True
        await asyncio.sleep(TURN_POLL_SECONDS)


async def give_turn(connection: AbstractConnection, name: str) -> None:
    """Let the turn `name` go before `connection` closes."""
    with contextlib.suppress(*BROKER_ERRORS):
        channel = await connection.channel(publisher_confirms=False)
        await channel.queue_delete(name)
        await channel.close()


def named(what: str) -> FieldTable:
    """Client properties that name a connection "relay <what>" in the broker's connection list
    (management UI, `rabbitmqctl list_connections client_properties`)."""
    return {"connection_name": f"relay {what}"}


async def another_connection(connection: AbstractConnection, what: str) -> AbstractConnection:
    """A second connection to the node `connection` is connected to: for publishes, which must
    stay off a connection that consumes (a block stops the broker reading acks too)."""
    url = _aiormq.underlay(connection).url
    return await aio_pika.connect(url, timeout=CONNECT_SECONDS, client_properties=named(what))


async def close_quietly(connection: AbstractConnection) -> None:
    with contextlib.suppress(*BROKER_ERRORS):
        await asyncio.wait_for(connection.close(), timeout=5)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
