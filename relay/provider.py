"""What a webhook provider module offers, and the registry of them by `scheme`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from relay.settings import SourceSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A verified, validated webhook, ready to publish."""

    id: str  # the provider's event id
    source: str
    name: str  # snake_case event name: the routing key's second part
    type: int | None
    key: str  # the ordering key
    occurred_at: str | None
    data: dict[str, Any]
    data_json: bytes  # `data` exactly as the provider sent it: forwarded as is, never re-encoded

    @property
    def message_id(self) -> str:
        return f"{self.source}:{self.id}"

    @property
    def routing_key(self) -> str:
        return f"{self.source}.{self.name}"


class Provider(Protocol):
    def parse(self, body: bytes, source: SourceSettings, now: float) -> Event:
        """Verify and validate a request body; raise BadSignature or BadPayload."""
        ...

    def event_names(self, source: SourceSettings) -> list[str]:
        """Every event name the source knows, for wildcard expansion."""
        ...

    def sample(self, source: SourceSettings, *, event_id: int, key: int, now: float) -> bytes:
        """A signed sample webhook body, for `relay send` and `relay bench`."""
        ...


def _registry() -> dict[str, Provider]:
    from relay import envoice

    return {"envoice": envoice}


PROVIDERS: dict[str, Provider] = _registry()
