"""RabbitMQ's management HTTP API, read-only, for what AMQP cannot tell an operator tool: the
bindings that exist, every consumer of a queue (standbys included) and unacknowledged counts.

Needs the `rabbitmq_management` plugin (deploy/setup.sh enables it); `broker.management_url`
says where it listens, with the AMQP URL's user and password.
"""

from __future__ import annotations

import base64
from typing import Any, cast
from urllib.parse import quote

import aiohttp

from relay.errors import BrokerUnavailable
from relay.settings import BrokerSettings

TIMEOUT_SECONDS = 10


class Management:
    """`async with Management(settings.broker) as api:` then `await api.queue(name)`, ..."""

    def __init__(self, broker: BrokerSettings) -> None:
        self._bases = broker.management_bases  # a cluster's nodes: the first that answers
        self._base = self._bases[0]
        self._vhost_name = broker.vhost
        self._vhost = quote(broker.vhost, safe="")
        user, password = broker.credentials
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Management:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
        )
        # The API lists nothing for a vhost that does not exist, as for an empty one: ask first.
        if await self._get(f"vhosts/{self._vhost}") is None:
            await self._session.close()
            raise BrokerUnavailable(
                f"{self._base} refused vhost {self._vhost_name!r}: it does not exist, "
                "or the user may not use it"
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def queue(self, name: str) -> dict[str, Any] | None:
        """A queue's details (`messages_ready`, `messages_unacknowledged`, `consumer_details`,
        ...), or None if it does not exist."""
        return cast(dict[str, Any] | None, await self._get(f"queues/{self._vhost}/{_q(name)}"))

    async def queues(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], await self._get(f"queues/{self._vhost}") or [])

    async def exchanges(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], await self._get(f"exchanges/{self._vhost}") or [])

    async def bindings_from(self, exchange: str) -> list[dict[str, Any]]:
        """The bindings whose source is `exchange` (none if it does not exist)."""
        path = f"exchanges/{self._vhost}/{_q(exchange)}/bindings/source"
        return cast(list[dict[str, Any]], await self._get(path) or [])

    async def _get(self, path: str) -> Any:
        """From the address that answered last, else the others in turn."""
        start = self._bases.index(self._base)
        reasons = []
        for base in self._bases[start:] + self._bases[:start]:
            try:
                found = await self._get_from(base, path)
            except _Unreachable as exc:
                reasons.append(f"{base} ({exc})")
                continue
            self._base = base
            return found
        raise BrokerUnavailable(
            f"management API unreachable at {', '.join(reasons)}: is the rabbitmq_management "
            "plugin enabled? (broker.management_url says where)"
        )

    async def _get_from(self, base: str, path: str) -> Any:
        assert self._session is not None, "use `async with Management(...)`"
        url = base + "api/" + path
        try:
            async with self._session.get(url) as response:
                if response.status == 404:
                    return None
                if response.status in (401, 403):
                    raise BrokerUnavailable(
                        f"management API at {base} refused relay's credentials "
                        f"(HTTP {response.status}): the user needs the management tag"
                    )
                if response.status != 200:
                    raise BrokerUnavailable(
                        f"management API at {base} answered HTTP {response.status}"
                    )
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unreachable(type(exc).__name__) from None


class _Unreachable(Exception):
    """A management API address did not answer."""


def _q(name: str) -> str:
    return quote(name, safe="")
