"""relay's exceptions: one root, a shallow tree."""

from __future__ import annotations


class RelayError(Exception):
    """Root of every error relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid; the message names the key."""


class OptionError(ConfigError):
    """A command-line option is invalid (exit 2 as for the config, but the file is not named)."""


class BrokerUnavailable(RelayError):
    """RabbitMQ is unreachable, refused relay, or did not confirm in time."""


class CannotListen(RelayError):
    """A port relay must serve on cannot be bound."""


class NotFound(RelayError):
    """Something an operator named does not exist on the broker."""


class Unroutable(RelayError):
    """The broker returned a published message as unroutable."""


class RequestError(RelayError):
    """A webhook request that relay refuses; carries the HTTP status."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadPayload(RequestError):
    """The body is not a valid webhook payload."""

    status = 400


class BadSignature(RequestError):
    """The signature is missing or wrong, or the timestamp is outside tolerance."""

    status = 401


class Retry(RelayError):
    """Raised by a handler: a transient failure, deliver again later."""

    def __init__(self, reason: str = "retry requested", *, after_seconds: float | None = None):
        super().__init__(reason)
        self.after_seconds = after_seconds


class Reject(RelayError):
    """Raised by a handler: a permanent failure, dead-letter the message."""
