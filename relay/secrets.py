"""Secrets: where they come from, how they are read as keys, and a repr that never shows them."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import ConfigError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret value; its repr names where it came from, never the value.

    `development` marks the fallback of `env:NAME:-default`, used when NAME is not set.
    """

    value: str = field(repr=False)
    origin: str = "literal"
    development: bool = False

    def __repr__(self) -> str:
        return f"Secret(<{self.origin}>)"

    __str__ = __repr__


def resolve_secret(spec: str, key: str) -> Secret:
    """`env:NAME`, `env:NAME:-default` (development only), `file:/path`, or a literal.

    An empty or blank value is refused wherever it comes from; a set but empty variable does not
    fall back to the development default."""
    if spec.startswith("env:"):
        name, _, default = spec[4:].partition(":-")
        if name in os.environ:
            return Secret(_not_blank(os.environ[name], key, f"environment variable {name}"),
                          f"env:{name}")  # fmt: skip
        if not default:
            raise ConfigError(f"{key}: environment variable {name} is not set")
        return Secret(_not_blank(default, key, "the default"), f"env:{name} default", True)
    if spec.startswith("file:"):
        try:
            value = Path(spec[5:]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read secret file: {exc.strerror}") from None
        return Secret(_not_blank(value, key, "secret file"), spec)
    return Secret(_not_blank(spec, key, "secret"))


def _not_blank(value: str, key: str, what: str) -> str:
    if not value.strip():
        raise ConfigError(f"{key}: {what} is empty")
    return value


def standard_webhooks_key(secret: Secret) -> bytes:
    """The HMAC key of a Standard Webhooks secret, read exactly as the reference
    `standardwebhooks` library reads it: `whsec_` is dropped, the rest is base64 (padding added,
    characters outside the alphabet skipped). Raises ConfigError if that gives no key."""
    value = secret.value.removeprefix("whsec_")
    try:
        key = base64.b64decode(value + "==")
    except (binascii.Error, ValueError):
        raise ConfigError("expected whsec_<base64> or base64") from None
    if not key:
        raise ConfigError("expected whsec_<base64> or base64, which decodes to no key")
    return key
