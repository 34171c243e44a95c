"""Built-in Python handlers, usable as `call = "relay.handlers:<name>"`."""

from __future__ import annotations

from typing import Any

import structlog

_logger = structlog.get_logger("relay.handlers")


async def log(message: dict[str, Any]) -> None:
    """Logs each activity: the default config's handler, to watch traffic flow."""
    _logger.info(
        "activity",
        id=message.get("id"),
        activity_event=message.get("event"),
        key=message.get("key"),
        occurred_at=message.get("occurred_at"),
    )
