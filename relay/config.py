"""Loading a config: parse it (relay/settings.py, a leaf), then resolve what needs the schemes.

Each source's scheme must exist and reads its own options; a source without
`tolerance_seconds` gets its scheme's default; each handler's event patterns become topic
bindings, a `*` inside a word expanded against the sources' known event names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay.errors import ConfigError
from relay.providers import PROVIDERS
from relay.settings import HandlerSettings, Settings, SourceSettings


def load(path: str | Path | None = None) -> Settings:
    """The config file (else $RELAY_CONFIG, else config/relay.toml), checked whole; raises
    ConfigError naming the file and the key."""
    settings = Settings.from_file(path)
    try:
        return resolve(settings)
    except ConfigError as exc:
        raise ConfigError(f"{Settings.path(path)}: {exc}") from None


def from_dict(raw: Mapping[str, Any]) -> Settings:
    return resolve(Settings.from_dict(raw))


def resolve(settings: Settings) -> Settings:
    sources = tuple(_source(s, f"sources[{i}]") for i, s in enumerate(settings.sources))
    handlers = tuple(
        replace(h, bindings=_bindings(h, sources, f"handlers[{i}].events"))
        for i, h in enumerate(settings.handlers)
    )
    return replace(settings, sources=sources, handlers=handlers)


def _source(source: SourceSettings, key: str) -> SourceSettings:
    provider = PROVIDERS.get(source.scheme)
    if provider is None:
        supported = ", ".join(sorted(PROVIDERS))
        raise ConfigError(
            f"{key}.scheme: unknown scheme {source.scheme!r} (supported: {supported})"
        )
    tolerance = source.tolerance_seconds
    return replace(
        source,
        options=provider.options(source, key),
        tolerance_seconds=provider.DEFAULT_TOLERANCE if tolerance is None else tolerance,
    )


def _bindings(
    handler: HandlerSettings, sources: tuple[SourceSettings, ...], key: str
) -> tuple[str, ...]:
    """Topic patterns as bindings; a `*` inside a word expands against known event names. A
    pattern must match a known event, unless its source's events are open (the scheme lists
    none: the event comes from the payload)."""
    by_name = {s.name: s for s in sources}
    known = [f"{s.name}.{e}" for s in sources for e in PROVIDERS[s.scheme].event_names(s)]
    bindings: list[str] = []
    for i, pattern in enumerate(handler.events):
        words = pattern.split(".")
        if any(not w for w in words):
            raise ConfigError(f"{key}[{i}]: {pattern!r} has an empty word")
        source = by_name.get(words[0])
        if words[0] not in ("*", "#") and source is None:
            raise ConfigError(f"{key}[{i}]: {pattern!r} names no configured source")
        open_events = source is not None and not PROVIDERS[source.scheme].event_names(source)
        plain = all(w in ("*", "#") or ("*" not in w and "#" not in w) for w in words)
        matches = [event for event in known if event_matches(pattern, event)]
        if plain:
            unknown_type = len(words) == 2 and re.fullmatch(r"type_\d+", words[1])
            if not (matches or unknown_type or open_events):
                raise ConfigError(f"{key}[{i}]: {pattern!r} matches no known event")
            bindings.append(pattern)
        elif not matches:
            raise ConfigError(f"{key}[{i}]: {pattern!r} matches no known event")
        else:
            bindings.extend(matches)
    return tuple(dict.fromkeys(bindings))


def event_matches(pattern: str, routing_key: str) -> bool:
    """Whether a handler's event pattern covers an event's routing key: topic matching (relay/
    wire.py), with `*` also allowed inside a word, as a glob (expanded into bindings at start)."""
    return _words_match(pattern.split("."), routing_key.split("."))


def _words_match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_words_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    glob = ".*".join(re.escape(part) for part in head.split("*"))
    return re.fullmatch(glob, words[0]) is not None and _words_match(rest, words[1:])
