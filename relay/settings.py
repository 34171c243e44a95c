"""Settings: frozen dataclasses loaded once from one TOML file and passed down.

A leaf: it knows no scheme and no broker. `relay.config.load` reads a file into these and then
resolves what needs the schemes (their options, event names for patterns).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from relay.errors import ConfigError
from relay.secrets import LOOPBACK_HOSTS, Secret, resolve_secret, standard_webhooks_key

DEFAULT_CONFIG = "config/relay.toml"
MAX_PARTITIONS = 64  # relay.wire.BUCKETS: each partition owns at least one bucket
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MAX_AGE_RE = re.compile(r"^[1-9][0-9]*[YMDhms]$")  # RabbitMQ's x-max-age: 7D, 12h, 90m, 30s
MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES = 1000, 3_000_000_000  # a stream's segment file


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSettings:
    url: str = field(default="amqp://guest:guest@localhost:5672/", repr=False)
    # More nodes of the same cluster (broker.url given as a list): connections go to each in turn
    other_urls: tuple[str, ...] = field(default=(), repr=False)
    exchange: str = "relay.activities"
    publish_timeout_seconds: float = 5.0
    management_url: str = ""  # RabbitMQ's management API; "" is http://<url's host>:15672/
    # AMQP heartbeat asked for on every connection, unless a URL says ?heartbeat= itself: a
    # client of a node cut off from it notices in about 3 x (this + 1) s (0: no heartbeats)
    heartbeat_seconds: int = 10

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.other_urls)

    @property
    def connection_urls(self) -> tuple[str, ...]:
        """The URLs relay connects with: each asks for heartbeat_seconds unless it names a
        heartbeat of its own (aiormq otherwise asks for 60 s, whatever the broker offers)."""
        return tuple(with_heartbeat(url, self.heartbeat_seconds) for url in self.urls)

    @property
    def vhost(self) -> str:
        return unquote(urlsplit(self.url).path[1:]) or "/"

    @property
    def management_bases(self) -> tuple[str, ...]:
        """Where the management API may answer, ending in '/': management_url, else port 15672
        of each node's host."""
        if self.management_url:
            return (self.management_url.rstrip("/") + "/",)
        hosts = dict.fromkeys(urlsplit(url).hostname or "localhost" for url in self.urls)
        return tuple(f"http://{host}:15672/" for host in hosts)

    @property
    def credentials(self) -> tuple[str, str]:
        parts = urlsplit(self.url)
        return unquote(parts.username or "guest"), unquote(parts.password or "guest")

    @property
    def safe_url(self) -> str:
        """The URLs with their passwords masked, for logs."""
        return ", ".join(masked(url) for url in self.urls)

    def __repr__(self) -> str:
        return f"BrokerSettings(url={self.safe_url!r}, exchange={self.exchange!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class IngressSettings:
    host: str = "0.0.0.0"  # noqa: S104 - an ingress listens on all interfaces by default
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None  # set: /healthz, /readyz and /metrics move to this port
    max_body_bytes: int = 262_144
    body_timeout_seconds: float = 10.0  # a body not received by then: 408
    keepalive_seconds: float = 30.0  # idle connections, and headers of a new one, close after
    max_connections: int = 1000  # more connections at once are refused
    # publishes in flight per process; new webhooks beyond get 503 at once (docs/PERFORMANCE.md,
    # "Overload", derives it)
    max_in_flight: int = 256
    # connections waiting to be accepted beyond which new ones and new webhooks get 503 at once:
    # the CPU-bound case (ditto)
    max_accept_queue: int = 64
    drain_seconds: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # set: the worker serves Prometheus /metrics on it


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleSettings:
    """`relay console`, the operators' web page: where it listens and who may do what.

    `token` logs in an operator, who may also act (replay, purge); `read_token` logs in a
    reader, who may only look; with `public_read`, anyone who reaches the page may look. With
    none of them, nobody gets in (refused when loaded)."""

    host: str = "127.0.0.1"
    port: int = 8090
    token: Secret | None = None
    read_token: Secret | None = None
    public_read: bool = False
    refresh_seconds: float = 5.0  # the overview polls this often
    management_ui: str = ""  # links to queues; "" is the first of broker.management_bases


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiveSettings:
    """The archive stream (every accepted webhook) and the handlers' outcome logs: retention."""

    enabled: bool = True
    max_age: str = "7D"  # RabbitMQ x-max-age: digits and one of Y M D h m s
    max_bytes: int = 0  # x-max-length-bytes; 0: no size limit
    # x-stream-max-segment-size-bytes: retention drops whole segments, so a smaller segment
    # makes it finer
    segment_bytes: int = 100_000_000
    outcomes_max_age: str = "30D"
    outcomes_max_bytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RepeatsSettings:
    """How long and how many accepted ids the ingress, and delivered ids each handler, remember
    (relay/seen.py): a copy of one within the horizon is a repeat."""

    horizon: str = "30d"  # "30d", "12h", "90m"; at most what the outcome logs keep
    max_ids: int = 10_000_000  # per ingress process, and per handler in a worker: oldest go first

    @property
    def horizon_seconds(self) -> int:
        seconds = duration_seconds(self.horizon)
        assert seconds is not None  # validated when read
        return seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceSettings:
    name: str
    path: str
    scheme: str
    secrets: tuple[Secret, ...]
    tolerance_seconds: int | None = None  # None: the scheme's default (relay.config sets it)
    options: Any = field(default_factory=dict)  # the scheme's own keys (relay.config reads them)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerSettings:
    name: str
    events: tuple[str, ...]
    bindings: tuple[str, ...] = ()  # the events as topic bindings (relay.config expands them)
    url: str | None = None
    call: str | None = None
    signing_secret: Secret | None = None
    partitions: int = 4
    concurrency: int = 64  # deliveries in flight per worker, across the handler's partitions
    # A partition holds about window_bytes of messages at once (bodies and about 1 KiB each
    # besides), at most `window` of them (its prefetch; relay/worker/keys.py)
    window: int = 8192
    window_bytes: int = 4 * 1024 * 1024
    # The handler's, across all its workers and processes (each worker takes the share of the
    # partitions it holds: relay/worker/rate.py); max_rate adapts below itself to 429, 503
    # and rising latency
    max_rate: float | None = None  # deliveries per second
    max_concurrency: int | None = None  # deliveries in flight (at least `partitions`)
    max_attempts: int = 8
    backoff_initial_ms: int = 500
    backoff_max_ms: int = 60_000
    timeout_seconds: float = 10.0
    # A new handler first receives what the archive holds of its events from this long before
    # its topology was declared (relay/replays.py): "30d", "12h", "90m"
    backfill: str | None = None

    def queue(self, partition: int) -> str:
        return f"relay.{self.name}.{partition}"

    @property
    def queues(self) -> list[str]:
        return [self.queue(i) for i in range(self.partitions)]

    @property
    def exchange(self) -> str:
        """The handler's headers exchange that routes each key to its partition."""
        return f"relay.{self.name}"

    @property
    def dead_letter_queue(self) -> str:
        return f"relay.{self.name}.dlq"

    @property
    def outcome_log(self) -> str:
        """The stream of the handler's final delivery outcomes."""
        return f"relay.{self.name}.outcomes"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    ingress: IngressSettings = field(default_factory=IngressSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    repeats: RepeatsSettings = field(default_factory=RepeatsSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    sources: tuple[SourceSettings, ...] = ()
    handlers: tuple[HandlerSettings, ...] = ()

    @staticmethod
    def path(path: str | Path | None = None) -> Path:
        """The config file: `path`, else $RELAY_CONFIG, else config/relay.toml."""
        return Path(path or os.environ.get("RELAY_CONFIG") or DEFAULT_CONFIG)

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> Settings:
        """Load and validate; raise ConfigError naming the offending key."""
        path = cls.path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Settings:
        t = _Table(raw, "")
        t.only(
            "broker", "ingress", "worker", "archive", "repeats", "console", "sources", "handlers"
        )  # fmt: skip
        broker = _broker(t.table("broker"))
        ingress = _ingress(t.table("ingress"))
        worker = _worker(t.table("worker"))
        archive = _archive(t.table("archive"))
        repeats = _repeats(t.table("repeats"), archive)
        console = _console(t.table("console"))
        sources = tuple(_source(s) for s in t.tables("sources"))
        development_secrets_on_loopback_only(sources, ingress)
        _unique(sources, "name", "sources")
        _unique(sources, "path", "sources")
        handlers = tuple(_handler(h) for h in t.tables("handlers"))
        _unique(handlers, "name", "handlers")
        for i, handler in enumerate(handlers):
            if handler.exchange in (broker.exchange, "relay.unrouted"):
                raise ConfigError(
                    f"handlers[{i}].name: {handler.name!r} clashes with exchange {handler.exchange}"
                )
            if handler.backfill and not archive.enabled:
                raise ConfigError(
                    f"handlers[{i}].backfill: a backfill reads the archive, and [archive] is off"
                )
        return cls(
            broker=broker,
            ingress=ingress,
            worker=worker,
            archive=archive,
            repeats=repeats,
            console=console,
            sources=sources,
            handlers=handlers,
        )

    def source(self, name: str) -> SourceSettings:
        for source in self.sources:
            if source.name == name:
                return source
        raise ConfigError(f"no source named {name!r} in the config")

    def handler(self, name: str) -> HandlerSettings:
        for handler in self.handlers:
            if handler.name == name:
                return handler
        raise ConfigError(f"no handler named {name!r} in the config")


class _Table:
    """A TOML table being validated; knows its own key path for error messages."""

    def __init__(self, raw: Mapping[str, Any], path: str) -> None:
        self.raw, self.path = raw, path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def only(self, *names: str) -> None:
        for name in self.raw:
            if name not in names:
                raise ConfigError(f"{self.key(name)}: unknown key")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if name not in self.raw:
            if default is None:
                raise ConfigError(f"{self.key(name)}: required")
            return default
        value = self.raw[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            got = type(value).__name__  # never the value: it may be a secret
            raise ConfigError(f"{self.key(name)}: expected {wanted}, got {got}")
        return value

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float,
        maximum: float | None = None,
        integer: bool = True,
    ) -> Any:
        value = self.get(name, int if integer else (int, float), default)
        if value < minimum:
            raise ConfigError(f"{self.key(name)}: must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.key(name)}: must be at most {maximum}, got {value!r}")
        return value

    def port(self, name: str, default: int = 0) -> int:
        port: int = self.number(name, default, minimum=0)
        if port > 65535:
            raise ConfigError(f"{self.key(name)}: must be at most 65535, got {port}")
        return port

    def optional_port(self, name: str) -> int | None:
        return self.port(name) if name in self.raw else None

    def table(self, name: str) -> _Table:
        return _Table(self.get(name, dict, {}), self.key(name))

    def tables(self, name: str) -> list[_Table]:
        items = self.get(name, list, [])
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.key(name)}[{i}]: expected a table")
        return [_Table(item, f"{self.key(name)}[{i}]") for i, item in enumerate(items)]

    def name(self) -> str:
        value: str = self.get("name", str)
        if not NAME_RE.match(value):
            raise ConfigError(
                f"{self.key('name')}: {value!r} must be lowercase letters, digits, '_' or '-'"
            )
        return value


def masked(url: str) -> str:
    """`url` with its password masked, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def with_heartbeat(url: str, seconds: int) -> str:
    """`url` with ?heartbeat=`seconds` added, unless its query names a heartbeat already."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "heartbeat" for name, _ in query):
        return url
    return urlunsplit(parts._replace(query=urlencode([*query, ("heartbeat", str(seconds))])))


def _broker(t: _Table) -> BrokerSettings:
    t.only("url", "exchange", "publish_timeout_seconds", "management_url", "heartbeat_seconds")
    d = BrokerSettings()  # the defaults
    management_url = t.get("management_url", str, d.management_url)
    if management_url and urlsplit(management_url).scheme not in ("http", "https"):
        raise ConfigError(f"{t.key('management_url')}: expected an http:// or https:// URL")
    urls = _broker_urls(t)
    return BrokerSettings(
        url=urls[0],
        other_urls=urls[1:],
        exchange=t.get("exchange", str, d.exchange),
        publish_timeout_seconds=t.number(
            "publish_timeout_seconds", d.publish_timeout_seconds, minimum=0.1, integer=False
        ),
        management_url=management_url,
        heartbeat_seconds=t.number("heartbeat_seconds", d.heartbeat_seconds, minimum=0),
    )


def _broker_urls(t: _Table) -> tuple[str, ...]:
    """broker.url: one URL, or a list of a cluster's nodes; $RELAY_AMQP_URL (comma-separated
    for several) overrides it."""
    from_env = os.environ.get("RELAY_AMQP_URL")

    def refuse(problem: str) -> ConfigError:
        origin = " (from $RELAY_AMQP_URL)" if from_env else ""
        return ConfigError(f"{t.key('url')}: {problem}{origin}")

    if from_env:
        urls: tuple[Any, ...] = tuple(u.strip() for u in from_env.split(","))
    else:
        given = t.get("url", (str, list), BrokerSettings().url)
        urls = (given,) if isinstance(given, str) else tuple(given)
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise refuse("expected an amqp:// URL or a list of them")
    for url in urls:
        if urlsplit(url).scheme not in ("amqp", "amqps"):
            raise refuse(f"expected an amqp:// or amqps:// URL, got {masked(url)!r}")
    if len({urlsplit(url).path for url in urls}) > 1:
        raise refuse("the URLs name different vhosts; they must be nodes of one")
    return urls


def _ingress(t: _Table) -> IngressSettings:
    t.only(
        "host", "port", "admin_host", "admin_port", "max_body_bytes", "body_timeout_seconds",
        "keepalive_seconds", "max_connections", "max_in_flight", "max_accept_queue",
        "drain_seconds",
    )  # fmt: skip
    d = IngressSettings()  # the defaults
    return IngressSettings(
        host=t.get("host", str, d.host),
        port=t.port("port", d.port),
        admin_host=t.get("admin_host", str, d.admin_host),
        admin_port=t.optional_port("admin_port"),
        max_body_bytes=t.number("max_body_bytes", d.max_body_bytes, minimum=1),
        body_timeout_seconds=t.number(
            "body_timeout_seconds", d.body_timeout_seconds, minimum=0.1, integer=False
        ),
        keepalive_seconds=t.number(
            "keepalive_seconds", d.keepalive_seconds, minimum=1, integer=False
        ),
        max_connections=t.number("max_connections", d.max_connections, minimum=1),
        max_in_flight=t.number("max_in_flight", d.max_in_flight, minimum=1),
        max_accept_queue=t.number("max_accept_queue", d.max_accept_queue, minimum=1),
        drain_seconds=t.number("drain_seconds", d.drain_seconds, minimum=0, integer=False),
    )


def _worker(t: _Table) -> WorkerSettings:
    t.only("metrics_host", "metrics_port")
    return WorkerSettings(
        metrics_host=t.get("metrics_host", str, WorkerSettings().metrics_host),
        metrics_port=t.optional_port("metrics_port"),
    )


def console_exposed(console: ConsoleSettings) -> ConsoleSettings:
    """`console`, unless it would serve a token's development default beyond loopback (its
    host from the config or from `relay console --host`)."""
    for name in ("token", "read_token"):
        secret: Secret | None = getattr(console, name)
        if secret is not None and secret.development and console.host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"console.{name}: {secret.origin.removesuffix(' default')} is not set, and its "
                f"development default is refused while console.host is {console.host!r} (not "
                "loopback)"
            )
    return console


def _console(t: _Table) -> ConsoleSettings:
    t.only("host", "port", "token", "read_token", "public_read", "refresh_seconds", "management_ui")
    d = ConsoleSettings()  # the defaults
    token, read_token = (
        resolve_secret(spec, t.key(name)) if (spec := t.get(name, str, "")) else None
        for name in ("token", "read_token")
    )
    management_ui = t.get("management_ui", str, d.management_ui)
    if management_ui and urlsplit(management_ui).scheme not in ("http", "https"):
        raise ConfigError(f"{t.key('management_ui')}: expected an http:// or https:// URL")
    return console_exposed(
        ConsoleSettings(
            host=t.get("host", str, d.host),
            port=t.port("port", d.port),
            token=token,
            read_token=read_token,
            public_read=t.get("public_read", bool, d.public_read),
            refresh_seconds=t.number(
                "refresh_seconds", d.refresh_seconds, minimum=0.5, integer=False
            ),
            management_ui=management_ui,
        )
    )


def _archive(t: _Table) -> ArchiveSettings:
    t.only(
        "enabled", "max_age", "max_bytes", "segment_bytes", "outcomes_max_age",
        "outcomes_max_bytes",
    )  # fmt: skip
    # The broker takes 0 to 3e9, but a segment of 8 bytes or less (its header) makes the
    # stream's writer open new segments for ever, confirming nothing (docs/RABBITMQ.md).
    d = ArchiveSettings()  # the defaults
    segment_bytes = t.number(
        "segment_bytes", d.segment_bytes, minimum=MIN_SEGMENT_BYTES, maximum=MAX_SEGMENT_BYTES
    )
    return ArchiveSettings(
        enabled=t.get("enabled", bool, d.enabled),
        max_age=_max_age(t, "max_age", d.max_age),
        max_bytes=_max_bytes(t, "max_bytes", d.max_bytes, segment_bytes),
        segment_bytes=segment_bytes,
        outcomes_max_age=_max_age(t, "outcomes_max_age", d.outcomes_max_age),
        outcomes_max_bytes=_max_bytes(t, "outcomes_max_bytes", d.outcomes_max_bytes, segment_bytes),
    )


def _repeats(t: _Table, archive: ArchiveSettings) -> RepeatsSettings:
    """The horizon defaults to the field's (30 days), or what the outcome logs keep if that is
    less: a handler's repeats are judged on its outcome log."""
    t.only("horizon", "max_ids")
    d = RepeatsSettings()  # the defaults
    kept = max_age_seconds(archive.outcomes_max_age)
    # A default computed from another setting: at most what archive.outcomes_max_age keeps
    default = d.horizon if kept >= d.horizon_seconds else f"{kept}s"
    horizon: str = t.get("horizon", str, default)
    seconds = duration_seconds(horizon)
    if not seconds:
        raise ConfigError(
            f"{t.key('horizon')}: {horizon!r} is not a duration such as 30d, 12h, 90m"
        )
    if seconds > kept:
        raise ConfigError(
            f"{t.key('horizon')}: {horizon} is longer than the outcome logs keep "
            f"(archive.outcomes_max_age {archive.outcomes_max_age}): the record of a delivery "
            "would be gone before its repeats; shorten it or keep the logs longer"
        )
    return RepeatsSettings(horizon=horizon, max_ids=t.number("max_ids", d.max_ids, minimum=1))


def _max_bytes(t: _Table, name: str, default: int, segment_bytes: int) -> int:
    """0 (no size limit), or at least two segments: retention by size deletes whole segments
    and keeps the newest, which may hold next to nothing, so a limit of about one segment can
    leave a stream empty (docs/RABBITMQ.md)."""
    value: int = t.number(name, default, minimum=0)
    if 0 < value < 2 * segment_bytes:
        raise ConfigError(
            f"{t.key(name)}: {value} is less than two segments (segment_bytes {segment_bytes}): "
            "set 0 (no size limit) or at least twice segment_bytes"
        )
    return value


def _max_age(t: _Table, name: str, default: str) -> str:
    value: str = t.get(name, str, default)
    if not MAX_AGE_RE.match(value):
        raise ConfigError(
            f"{t.key(name)}: {value!r} is not a RabbitMQ max age: a positive whole number and "
            "one unit of Y, M, D, h, m, s (7D, 12h)"
        )
    return value


def development_secrets_on_loopback_only(
    sources: tuple[SourceSettings, ...], ingress: IngressSettings
) -> None:
    """A development default secret (`env:NAME:-default` with NAME unset) is known to anyone who
    read the config: refused unless the ingress listens on loopback only."""
    if ingress.host in LOOPBACK_HOSTS:
        return
    for i, source in enumerate(sources):
        for j, secret in enumerate(source.secrets):
            if secret.development:
                raise ConfigError(
                    f"sources[{i}].secrets[{j}]: {secret.origin.removesuffix(' default')} is not "
                    f"set, and its development default is refused while ingress.host is "
                    f"{ingress.host!r} (not loopback): set the variable"
                )


def _source(t: _Table) -> SourceSettings:
    path = t.get("path", str)
    if not path.startswith("/"):
        raise ConfigError(f"{t.key('path')}: must start with '/'")
    specs = t.get("secrets", list)
    if not specs or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f"{t.key('secrets')}: expected a non-empty list of strings")
    common = ("name", "path", "scheme", "secrets", "tolerance_seconds")
    return SourceSettings(
        name=t.name(),
        path=path,
        scheme=t.get("scheme", str),
        secrets=tuple(resolve_secret(s, f"{t.key('secrets')}[{i}]") for i, s in enumerate(specs)),
        tolerance_seconds=(  # not given: None, the scheme's default (per scheme: relay.config)
            t.number("tolerance_seconds", 0, minimum=0) if "tolerance_seconds" in t.raw else None
        ),
        options={k: v for k, v in t.raw.items() if k not in common},
    )


def _handler(t: _Table) -> HandlerSettings:
    t.only(
        "name", "events", "url", "call", "signing_secret", "partitions", "concurrency", "window",
        "window_bytes", "max_rate", "max_concurrency", "max_attempts", "backoff_initial_ms",
        "backoff_max_ms", "timeout_seconds", "backfill",
    )  # fmt: skip
    events = t.get("events", list)
    if not events or not all(isinstance(e, str) for e in events):
        raise ConfigError(f"{t.key('events')}: expected a non-empty list of strings")
    # "" for url, call, signing_secret and backfill: not given (their fields' None)
    url, call = t.get("url", str, ""), t.get("call", str, "")
    if bool(url) == bool(call):
        raise ConfigError(f"{t.key('url')}: give exactly one of url or call")
    if url and urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"{t.key('url')}: expected an http:// or https:// URL")
    if call and not re.match(r"^[\w.]+:\w+$", call):
        raise ConfigError(f"{t.key('call')}: expected 'package.module:function'")
    secret = t.get("signing_secret", str, "")
    signing_secret = resolve_secret(secret, t.key("signing_secret")) if secret else None
    if signing_secret is not None:
        try:
            standard_webhooks_key(signing_secret)
        except ConfigError as exc:
            raise ConfigError(f"{t.key('signing_secret')}: {exc}") from None
    d = HandlerSettings(name="", events=())  # the defaults (name and events have none)
    initial = t.number("backoff_initial_ms", d.backoff_initial_ms, minimum=1)
    partitions = t.number("partitions", d.partitions, minimum=1, maximum=MAX_PARTITIONS)
    backfill = t.get("backfill", str, "")
    if backfill and duration_seconds(backfill) is None:
        raise ConfigError(f'{t.key("backfill")}: expected a duration such as "30d", "12h", "90m"')
    return HandlerSettings(
        name=t.name(),
        events=tuple(events),
        url=url or None,
        call=call or None,
        signing_secret=signing_secret,
        partitions=partitions,
        concurrency=t.number("concurrency", d.concurrency, minimum=1),
        window=t.number("window", d.window, minimum=1, maximum=65535),  # prefetch is 16 bits
        window_bytes=t.number("window_bytes", d.window_bytes, minimum=1),
        # 0 and unset alike: no limit (the field's None)
        max_rate=t.number("max_rate", 0, minimum=0, integer=False) or None,
        # Each partition gets a whole share of it (relay/worker/rate.py): at least one each
        max_concurrency=(
            t.number("max_concurrency", partitions, minimum=partitions)
            if "max_concurrency" in t.raw
            else None
        ),
        max_attempts=t.number("max_attempts", d.max_attempts, minimum=1),
        backoff_initial_ms=initial,
        # A default computed from another setting: never below backoff_initial_ms
        backoff_max_ms=t.number("backoff_max_ms", max(d.backoff_max_ms, initial), minimum=initial),
        timeout_seconds=t.number(
            "timeout_seconds", d.timeout_seconds, minimum=0.001, integer=False
        ),
        backfill=backfill or None,
    )


DURATION_RE = re.compile(r"^(\d+)([smhd])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


MAX_AGE_UNITS = {"Y": 365 * 86_400, "M": 30 * 86_400, "D": 86_400, "h": 3600, "m": 60, "s": 1}


def max_age_seconds(max_age: str) -> int:
    """Seconds in a RabbitMQ max age ("7D"), a month taken as 30 days."""
    return int(max_age[:-1]) * MAX_AGE_UNITS[max_age[-1]]


def duration_seconds(text: str) -> int | None:
    """Seconds in a duration such as "90m", "2h" or "7d" (s, m, h, d); None if it is not one."""
    match = DURATION_RE.match(text.strip())
    return int(match[1]) * DURATION_UNITS[match[2]] if match else None


def _unique(items: tuple[Any, ...], attr: str, key: str) -> None:
    seen: set[Any] = set()
    for i, item in enumerate(items):
        value = getattr(item, attr)
        if value in seen:
            raise ConfigError(f"{key}[{i}].{attr}: {value!r} is used twice")
        seen.add(value)
