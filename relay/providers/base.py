"""What a webhook scheme offers (`Provider`), and what it takes and gives: a `Request` in, an
`Event` out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from relay.settings import SourceSettings


@dataclass(frozen=True, slots=True)
class Request:
    """What a scheme sees of a webhook request: the raw body and the headers (any case)."""

    body: bytes
    headers: Mapping[str, str]  # case-insensitive, like aiohttp's or multidict.CIMultiDict


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A verified, validated webhook, ready to publish."""

    id: str  # the provider's event id
    source: str
    name: str  # the event name: the routing key after the source ("paid", "push.created")
    type: int | None
    key: str  # the ordering key
    occurred_at: str | None
    data: Any  # the payload as parsed
    data_json: bytes  # the payload exactly as the provider sent it: forwarded, never re-encoded

    @property
    def message_id(self) -> str:
        return f"{self.source}:{self.id}"

    @property
    def routing_key(self) -> str:
        return f"{self.source}.{self.name}"


class Provider(Protocol):
    # Seconds a request's timestamp may differ from now, when a source does not say (0: off).
    DEFAULT_TOLERANCE: int

    def options(self, source: SourceSettings, key: str) -> Any:
        """The scheme's own settings of a source, read from `source.options` (its config keys
        but the common ones) and checked with its secrets; raise ConfigError naming
        `key`.<option>."""
        ...

    def parse(self, request: Request, source: SourceSettings, now: float) -> Event:
        """Verify and validate a request; raise BadSignature or BadPayload."""
        ...

    def event_names(self, source: SourceSettings) -> list[str]:
        """Every event name the source knows, for wildcard expansion (may be empty)."""
        ...

    def sample(
        self,
        source: SourceSettings,
        *,
        event_id: int,
        key: int,
        now: float,
        occurred: float | None = None,
    ) -> Request:
        """A signed sample request, for `relay send` and `relay bench`, signed at `now`.

        The body is a function of `event_id`, `key` and `occurred` (the event's own time in the
        body, default `now`): called again later with the same three it is the same event, only
        what its scheme signs with a fresh time differs (`relay send --catch-up`)."""
        ...
