"""Settings: loading, defaults, secrets, validation errors naming the key, event patterns."""

from __future__ import annotations

import copy
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from relay.config import event_matches
from relay.config import from_dict as config_from_dict
from relay.config import load as load_config
from relay.errors import ConfigError
from relay.secrets import Secret
from relay.settings import ArchiveSettings, BrokerSettings, Settings
from tests.support import ROOT
from tests.support import run_relay as support_run_relay

DROP = object()  # an override value that removes the key

SOURCE: dict[str, Any] = {
    "name": "envoice",
    "path": "/webhooks/envoice",
    "scheme": "envoice",
    "secrets": ["literal-source-secret"],
}
HANDLER: dict[str, Any] = {
    "name": "billing",
    "events": ["envoice.paid"],
    "url": "http://127.0.0.1:9000/hooks",
}
NEW_PAYMENT_EVENTS = {
    "paypal", "stripe", "payoneer", "square", "klik_and_pay", "razorpay", "wepay", "halkbank",
    "two_checkout", "payment_wall", "bambora_eu", "bambora_na", "nlb", "authorize_net",
    "braintree",
}  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "RELAY_CONFIG", "RELAY_AMQP_URL", "RELAY_TEST_SECRET", "RELAY_TEST_UNSET",
        "ENVOICE_API_SECRET", "BILLING_WEBHOOK_SECRET",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    table = {**copy.deepcopy(base), **overrides}
    return {k: v for k, v in table.items() if v is not DROP}


def config(
    source: dict[str, Any] | None = None,
    handler: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """One source and one handler, each with `overrides` applied; other sections as given."""
    raw = {"sources": [merged(SOURCE, source or {})], "handlers": [merged(HANDLER, handler or {})]}
    return {**raw, **sections}


def load(**kwargs: Any) -> Settings:
    return config_from_dict(config(**kwargs))


def bindings(*events: str, **source: Any) -> tuple[str, ...]:
    return load(source=source, handler={"events": list(events)}).handlers[0].bindings


def raises_naming(key: str) -> pytest.RaisesExc[ConfigError]:
    """A ConfigError whose single line starts with the key."""
    return pytest.raises(ConfigError, match=rf"^{re.escape(key)}: [^\n]+$")


# --- loading ----------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = config_from_dict({"sources": [SOURCE], "handlers": [HANDLER]})

    assert settings.broker.url == "amqp://guest:guest@localhost:5672/"
    assert settings.broker.exchange == "relay.activities"
    assert settings.broker.publish_timeout_seconds == 5.0
    assert (settings.ingress.host, settings.ingress.port) == ("0.0.0.0", 8080)  # noqa: S104
    assert settings.ingress.max_body_bytes == 262_144
    assert settings.ingress.body_timeout_seconds == 10.0
    assert settings.ingress.keepalive_seconds == 30.0
    assert settings.ingress.max_connections == 1000
    assert settings.ingress.admin_port is None
    assert (settings.worker.metrics_host, settings.worker.metrics_port) == ("127.0.0.1", None)
    assert (settings.repeats.horizon, settings.repeats.max_ids) == ("30d", 10_000_000)
    source = settings.sources[0]
    assert source.tolerance_seconds == 0  # envoice's default (docs/SOURCES.md)
    assert source.options.signature_template == "{Timestamp}.{Activity}"
    assert source.options.signature_algorithm == "hmac-sha256"
    assert dict(source.options.types) == {}
    handler = settings.handlers[0]
    assert handler.call is None
    assert handler.signing_secret is None
    assert (handler.partitions, handler.max_attempts) == (4, 8)
    assert (handler.backoff_initial_ms, handler.backoff_max_ms) == (500, 60_000)
    assert handler.timeout_seconds == 10.0
    assert handler.queues == [f"relay.billing.{i}" for i in range(4)]
    assert handler.dead_letter_queue == "relay.billing.dlq"
    assert handler.outcome_log == "relay.billing.outcomes"
    assert settings.archive == ArchiveSettings(
        enabled=True,
        max_age="7D",
        max_bytes=0,
        segment_bytes=100_000_000,
        outcomes_max_age="30D",
        outcomes_max_bytes=0,
    )


def test_archive_options_are_read() -> None:
    archive: dict[str, Any] = {
        "enabled": False,
        "max_age": "14D",
        "max_bytes": 10_000_000_000,
        "segment_bytes": 1_000_000,
        "outcomes_max_age": "90D",
        "outcomes_max_bytes": 5_000_000_000,
    }

    settings = load(archive=archive)

    assert settings.archive == ArchiveSettings(**archive)


@pytest.mark.parametrize("age", ["1Y", "6M", "7D", "12h", "90m", "30s"])
def test_every_rabbitmq_max_age_unit_is_accepted(age: str) -> None:
    assert load(archive={"max_age": age, "outcomes_max_age": age}).archive.max_age == age


def test_the_repeats_horizon_defaults_to_30_days_or_what_the_outcome_logs_keep() -> None:
    assert load().repeats.horizon_seconds == 30 * 86_400
    assert load(archive={"outcomes_max_age": "7D"}).repeats.horizon_seconds == 7 * 86_400
    assert load(repeats={"horizon": "90m"}).repeats.horizon_seconds == 5400


@pytest.mark.parametrize(
    ("repeats", "archive"),
    [
        ({"horizon": "60d"}, {}),  # longer than the outcome logs keep (30D)
        ({"horizon": "1d"}, {"outcomes_max_age": "12h"}),
        ({"horizon": "soon"}, {}),
        ({"horizon": "0d"}, {}),
    ],
)
def test_a_repeats_horizon_the_outcome_logs_cannot_hold_is_refused(
    repeats: dict[str, Any], archive: dict[str, Any]
) -> None:
    with raises_naming("repeats.horizon"):
        load(repeats=repeats, archive=archive)


def test_empty_config_is_valid() -> None:
    settings = config_from_dict({})

    assert settings.sources == ()
    assert settings.handlers == ()


def test_backoff_max_defaults_to_at_least_the_initial_backoff() -> None:
    handler = load(handler={"backoff_initial_ms": 90_000}).handlers[0]

    assert handler.backoff_max_ms == 90_000


@pytest.mark.parametrize(
    ("explicit", "env", "default", "expected_port"),
    [
        (True, True, True, 1001),
        (False, True, True, 1002),
        (False, False, True, 1003),
    ],
    ids=["--config wins", "$RELAY_CONFIG next", "config/relay.toml last"],
)
def test_config_file_resolution(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    explicit: bool,
    env: bool,
    default: bool,
    expected_port: int,
) -> None:
    (tmp_path / "config").mkdir()
    files = {
        1001: tmp_path / "explicit.toml",
        1002: tmp_path / "from-env.toml",
        1003: tmp_path / "config" / "relay.toml",
    }
    for port, path in files.items():
        path.write_text(f"[ingress]\nport = {port}\n")
    monkeypatch.chdir(tmp_path)
    if env:
        monkeypatch.setenv("RELAY_CONFIG", str(files[1002]))

    settings = load_config(files[1001] if explicit else None)

    assert settings.ingress.port == expected_port


def test_amqp_url_from_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_AMQP_URL", "amqps://u:p@broker.example:5671/prod")

    settings = load(broker={"url": "amqp://guest:guest@localhost:5672/"})

    assert settings.broker.url == "amqps://u:p@broker.example:5671/prod"


def test_amqp_url_from_environment_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_AMQP_URL", "http://localhost:5672/")

    with raises_naming("broker.url"):
        load()


def test_broker_url_may_list_a_clusters_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = [f"amqp://relay:pw@rabbit-{i}:5672/prod" for i in range(3)]

    settings = load(broker={"url": nodes})

    assert settings.broker.urls == tuple(nodes)
    assert settings.broker.url == nodes[0]
    assert settings.broker.vhost == "prod"
    assert settings.broker.safe_url == ", ".join(u.replace(":pw@", ":***@") for u in nodes)
    assert "pw" not in repr(settings.broker)
    assert settings.broker.management_bases == tuple(f"http://rabbit-{i}:15672/" for i in range(3))

    monkeypatch.setenv("RELAY_AMQP_URL", "amqp://a:5672/, amqp://b:5672/")
    assert load(broker={"url": nodes}).broker.urls == ("amqp://a:5672/", "amqp://b:5672/")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ([], "expected an amqp:// URL or a list of them"),
        (["amqp://a/", 5], "expected an amqp:// URL or a list of them"),
        (["amqp://a/", "http://u:secret@b/"], "got 'http://u:***@b/'"),
        (["amqp://a/one", "amqp://b/two"], "different vhosts"),
    ],
)
def test_a_bad_list_of_broker_urls_is_a_config_error(url: Any, problem: str) -> None:
    with raises_naming("broker.url") as refused:
        load(broker={"url": url})
    assert problem in str(refused.value)
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read config"), ("[ingress\nport = 1", "not valid TOML")],
    ids=["missing", "not TOML"],
)
def test_unloadable_file_is_a_config_error(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "relay.toml"
    if content is not None:
        path.write_text(content)

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {problem}"):
        load_config(path)


def test_file_errors_are_prefixed_with_the_path_and_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[ingress]\nport = 70000\n")

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: ingress\.port: "):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "env", "handlers"),
    [("relay.toml", {}, 1), ("example.toml", {"BILLING_WEBHOOK_SECRET": "whsec_c2VjcmV0"}, 2)],
)
def test_shipped_configs_load(
    monkeypatch: pytest.MonkeyPatch, name: str, env: dict[str, str], handlers: int
) -> None:
    monkeypatch.setenv("ENVOICE_API_SECRET", "from-env")
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    settings = load_config(ROOT / "config" / name)

    assert settings.sources[0].secrets[0].value == "from-env"
    assert len(settings.handlers) == handlers  # else `all` below holds for none
    assert all(h.bindings for h in settings.handlers)


def test_example_config_routes_the_documented_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVOICE_API_SECRET", "x")
    monkeypatch.setenv("BILLING_WEBHOOK_SECRET", "whsec_c2VjcmV0")

    settings = load_config(ROOT / "config" / "example.toml")

    billing, audit = settings.handlers
    assert billing.bindings[0] == "envoice.paid"
    assert len(billing.bindings) == 1 + len(NEW_PAYMENT_EVENTS)
    assert audit.bindings == ("envoice.#",)
    assert audit.call == "relay.handlers:log"
    assert settings.sources[0].options.types == {49: "InvoiceArchived"}


def test_default_config_falls_back_to_the_development_secret() -> None:
    source = load_config(ROOT / "config" / "relay.toml").sources[0]

    assert source.secrets[0].value == "dev-insecure-secret"


def test_example_config_needs_its_secrets() -> None:
    with pytest.raises(ConfigError, match=r"sources\[0\]\.secrets\[0\]: .*ENVOICE_API_SECRET"):
        load_config(ROOT / "config" / "example.toml")


# --- secrets ----------------------------------------------------------------------------------


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SECRET", "from-env")

    secret = load(source={"secrets": ["env:RELAY_TEST_SECRET"]}).sources[0].secrets[0]

    assert secret.value == "from-env"


@pytest.mark.parametrize(("env", "expected"), [(None, "fallback"), ("from-env", "from-env")])
def test_secret_from_environment_with_default(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str
) -> None:
    if env is not None:
        monkeypatch.setenv("RELAY_TEST_SECRET", env)

    secret = (
        load(source={"secrets": ["env:RELAY_TEST_SECRET:-fallback"]}, ingress={"host": "127.0.0.1"})
        .sources[0]
        .secrets[0]
    )

    assert secret.value == expected
    assert secret.development == (env is None)


def test_secret_from_file_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\n")

    secret = load(source={"secrets": [f"file:{path}"]}).sources[0].secrets[0]

    assert secret.value == "from-file"


def test_literal_secrets_keep_their_order() -> None:
    secrets = load(source={"secrets": ["old", "new"]}).sources[0].secrets

    assert [s.value for s in secrets] == ["old", "new"]


def test_signing_secret_resolves_like_source_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SECRET", "whsec_abc")

    handler = load(handler={"signing_secret": "env:RELAY_TEST_SECRET"}).handlers[0]

    assert handler.signing_secret is not None
    assert handler.signing_secret.value == "whsec_abc"


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("env:RELAY_TEST_UNSET", "sources[0].secrets[1]"),
        ("env:RELAY_TEST_SECRET", "sources[0].secrets[1]"),  # set, but empty
        ("file:{tmp}/missing", "sources[0].secrets[1]"),
        ("file:{tmp}/empty", "sources[0].secrets[1]"),
        ("", "sources[0].secrets[1]"),
    ],
    ids=["env unset", "env empty", "file missing", "file empty", "literal empty"],
)
def test_unusable_secret_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, key: str
) -> None:
    monkeypatch.setenv("RELAY_TEST_SECRET", "")
    (tmp_path / "empty").write_text("\n")

    with raises_naming(key):
        load(source={"secrets": ["ok", spec.format(tmp=tmp_path)]})


def test_unusable_signing_secret_names_the_key() -> None:
    with raises_naming("handlers[0].signing_secret"):
        load(handler={"signing_secret": "env:RELAY_TEST_UNSET"})


def test_secrets_never_show_in_repr_or_str(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SECRET", "value-from-env")
    (tmp_path / "secret").write_text("value-from-file")
    monkeypatch.setenv("RELAY_AMQP_URL", "amqp://relay:broker-password@rabbit:5672/vh")

    settings = load(
        source={"secrets": ["value-literal", "env:RELAY_TEST_SECRET", f"file:{tmp_path}/secret"]},
        handler={"signing_secret": "env:RELAY_TEST_UNSET:-value-default"},
    )

    shown = " ".join(
        [repr(settings), str(settings), repr(settings.broker), settings.broker.safe_url]
        + [f"{s} {s!r}" for s in settings.sources[0].secrets]
    )
    for value in ("value-literal", "value-from-env", "value-from-file", "value-default"):
        assert value not in shown
    assert "broker-password" not in shown
    assert "amqp://relay:***@rabbit:5672/vh" in repr(settings.broker)
    assert "RELAY_TEST_SECRET" in shown  # the origin is named, so an operator can find it


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqps://user:p%40ss:word@h/vh", "amqps://user:***@h/vh"),
        ("amqp://localhost/", "amqp://localhost/"),
    ],
)
def test_broker_url_password_is_masked(url: str, safe: str) -> None:
    broker = BrokerSettings(url=url)

    assert broker.safe_url == safe
    assert safe in repr(broker)


def test_secret_repr_names_origin_only() -> None:
    secret = Secret("hunter2", "env:API_KEY")

    assert repr(secret) == str(secret) == f"{secret}" == "Secret(<env:API_KEY>)"


@pytest.mark.parametrize(
    ("source", "handler", "key"),
    [
        ({"secrets": "literal-source-secret"}, {}, "sources[0].secrets"),
        ({}, {"signing_secret": ["literal-signing-secret"]}, "handlers[0].signing_secret"),
    ],
)
def test_wrongly_typed_secret_is_not_echoed(
    source: dict[str, Any], handler: dict[str, Any], key: str
) -> None:
    with raises_naming(key) as error:
        load(source=source, handler=handler)

    assert "literal-" not in str(error.value)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"brokers": {}}, "brokers"),
        ({"broker": {"user": "guest"}}, "broker.user"),
        ({"broker": {"url": 5672}}, "broker.url"),
        ({"broker": {"url": "http://localhost:5672/"}}, "broker.url"),
        ({"broker": {"exchange": ["relay"]}}, "broker.exchange"),
        ({"broker": {"publish_timeout_seconds": 0}}, "broker.publish_timeout_seconds"),
        ({"broker": "amqp://localhost"}, "broker"),
        ({"ingress": {"port": 70000}}, "ingress.port"),
        ({"ingress": {"port": -1}}, "ingress.port"),
        ({"ingress": {"port": "8080"}}, "ingress.port"),
        ({"ingress": {"port": True}}, "ingress.port"),
        ({"ingress": {"port": 80.5}}, "ingress.port"),
        ({"ingress": {"max_body_bytes": 0}}, "ingress.max_body_bytes"),
        ({"ingress": {"listen": "127.0.0.1"}}, "ingress.listen"),
        ({"sources": {"name": "envoice"}}, "sources"),
        ({"sources": ["envoice"]}, "sources[0]"),
        ({"handlers": [HANDLER, "billing"]}, "handlers[1]"),
        ({"archive": {"max_days": 7}}, "archive.max_days"),
        ({"archive": {"enabled": "no"}}, "archive.enabled"),
        ({"archive": {"max_age": "7 days"}}, "archive.max_age"),
        ({"archive": {"max_age": "0D"}}, "archive.max_age"),
        ({"archive": {"max_age": "7d"}}, "archive.max_age"),
        ({"archive": {"max_age": "1h30m"}}, "archive.max_age"),
        ({"archive": {"max_age": 7}}, "archive.max_age"),
        ({"archive": {"max_bytes": -1}}, "archive.max_bytes"),
        ({"archive": {"segment_bytes": 0}}, "archive.segment_bytes"),
        ({"archive": {"segment_bytes": 8}}, "archive.segment_bytes"),
        ({"archive": {"segment_bytes": 3_000_000_001}}, "archive.segment_bytes"),
        ({"archive": {"max_bytes": 150_000_000}}, "archive.max_bytes"),
        (
            {"archive": {"segment_bytes": 1000, "outcomes_max_bytes": 1999}},
            "archive.outcomes_max_bytes",
        ),
        ({"archive": {"outcomes_max_age": "30"}}, "archive.outcomes_max_age"),
        ({"archive": {"outcomes_max_bytes": 1.5}}, "archive.outcomes_max_bytes"),
    ],
)
def test_bad_section_names_the_key(raw: dict[str, Any], key: str) -> None:
    with raises_naming(key):
        config_from_dict({"sources": [SOURCE], **raw})


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ({"secret": "x"}, "sources[0].secret"),
        ({"name": DROP}, "sources[0].name"),
        ({"name": "Envoice"}, "sources[0].name"),
        ({"name": "env.oice"}, "sources[0].name"),
        ({"path": DROP}, "sources[0].path"),
        ({"path": "webhooks/envoice"}, "sources[0].path"),
        ({"scheme": "smtp"}, "sources[0].scheme"),
        ({"scheme": DROP}, "sources[0].scheme"),
        ({"secrets": DROP}, "sources[0].secrets"),
        ({"secrets": []}, "sources[0].secrets"),
        ({"secrets": [42]}, "sources[0].secrets"),
        ({"tolerance_seconds": -1}, "sources[0].tolerance_seconds"),
        ({"tolerance_seconds": 1.5}, "sources[0].tolerance_seconds"),
        ({"signature_algorithm": "md5"}, "sources[0].signature_algorithm"),
        ({"signature_template": "{Timestamp}"}, "sources[0].signature_template"),
        ({"types": {"x": "Foo"}}, "sources[0].types.x"),
        ({"types": {"50": "not a name"}}, "sources[0].types.50"),
        ({"types": {"50": 50}}, "sources[0].types.50"),
        ({"types": {"²": "Squared"}}, "sources[0].types.²"),
        ({"types": "49=Archived"}, "sources[0].types"),
    ],
)
def test_bad_source_names_the_key(source: dict[str, Any], key: str) -> None:
    with raises_naming(key):
        load(source=source)


@pytest.mark.parametrize(
    ("handler", "key"),
    [
        ({"retries": 3}, "handlers[0].retries"),
        ({"name": "Billing"}, "handlers[0].name"),
        ({"events": DROP}, "handlers[0].events"),
        ({"events": []}, "handlers[0].events"),
        ({"events": "envoice.paid"}, "handlers[0].events"),
        ({"events": [11]}, "handlers[0].events"),
        ({"call": "billing:handle"}, "handlers[0].url"),
        ({"url": DROP}, "handlers[0].url"),
        ({"url": "ftp://billing/hooks"}, "handlers[0].url"),
        ({"url": DROP, "call": "billing.handle"}, "handlers[0].call"),
        ({"partitions": 0}, "handlers[0].partitions"),
        ({"max_attempts": 0}, "handlers[0].max_attempts"),
        ({"backoff_initial_ms": 0}, "handlers[0].backoff_initial_ms"),
        ({"backoff_initial_ms": 1000, "backoff_max_ms": 999}, "handlers[0].backoff_max_ms"),
        ({"timeout_seconds": 0}, "handlers[0].timeout_seconds"),
        ({"partitions": 4, "max_concurrency": 3}, "handlers[0].max_concurrency"),
        ({"max_rate": -1}, "handlers[0].max_rate"),
        ({"name": "unrouted"}, "handlers[0].name"),
        ({"name": "activities"}, "handlers[0].name"),
        ({"signing_secret": 5}, "handlers[0].signing_secret"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_handler_names_the_key(handler: dict[str, Any], key: str) -> None:
    with raises_naming(key):
        load(handler=handler)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"sources": [SOURCE, {**SOURCE, "path": "/other"}]}, "sources[1].name"),
        ({"sources": [SOURCE, {**SOURCE, "name": "other"}]}, "sources[1].path"),
        ({"sources": [SOURCE], "handlers": [HANDLER, HANDLER]}, "handlers[1].name"),
    ],
    ids=["source name", "source path", "handler name"],
)
def test_duplicates_name_the_second_key(raw: dict[str, Any], key: str) -> None:
    with raises_naming(key):
        config_from_dict(raw)


# --- events and bindings ----------------------------------------------------------------------


def test_wildcard_inside_a_word_expands_to_known_events() -> None:
    expanded = bindings("envoice.new_payment_with_*")

    assert set(expanded) == {f"envoice.new_payment_with_{name}" for name in NEW_PAYMENT_EVENTS}
    assert len(expanded) == 15


def test_handler_keeps_its_events_as_written() -> None:
    handler = load(handler={"events": ["envoice.paid", "envoice.new_payment_with_*"]}).handlers[0]

    assert handler.events == ("envoice.paid", "envoice.new_payment_with_*")
    assert handler.bindings[0] == "envoice.paid"
    assert len(handler.bindings) == 16


@pytest.mark.parametrize(
    "pattern",
    ["envoice.*", "envoice.#", "#", "*.paid", "#.paid", "envoice.paid", "envoice.type_77"],
)
def test_topic_patterns_are_bound_as_written(pattern: str) -> None:
    assert bindings(pattern) == (pattern,)


def test_overlapping_patterns_bind_once() -> None:
    assert bindings("envoice.paid", "envoice.pai*", "envoice.paid") == ("envoice.paid",)


@pytest.mark.parametrize(
    ("events", "key"),
    [
        (["envoice.payed"], "handlers[0].events[0]"),
        (["envoice.paid", "envoice.new_payment_with_bitcoin*"], "handlers[0].events[1]"),
        (["envoice.paid", "github.push"], "handlers[0].events[1]"),
        (["github.#"], "handlers[0].events[0]"),
        (["envoice..paid"], "handlers[0].events[0]"),
        (["envoice.type_x"], "handlers[0].events[0]"),
        (["envoice"], "handlers[0].events[0]"),
    ],
)
def test_pattern_matching_nothing_names_the_key(events: list[str], key: str) -> None:
    with raises_naming(key):
        load(handler={"events": events})


def test_types_override_renames_an_event() -> None:
    types = {"11": "Settled"}

    assert bindings("envoice.settled", types=types) == ("envoice.settled",)
    with raises_naming("handlers[0].events[0]"):
        bindings("envoice.paid", types=types)


def test_types_extension_adds_events_to_expansion() -> None:
    types = {"49": "InvoiceArchived"}

    assert set(bindings("envoice.invoice_*", types=types)) == {
        "envoice.invoice_digitally_signed",
        "envoice.invoice_archived",
    }
    assert load(source={"types": types}).sources[0].options.types == {49: "InvoiceArchived"}


@pytest.mark.parametrize(
    ("pattern", "routing_key", "expected"),
    [
        ("envoice.paid", "envoice.paid", True),
        ("envoice.paid", "envoice.paid.x", False),
        ("envoice.paid", "github.paid", False),
        ("envoice.*", "envoice.paid", True),
        ("envoice.*", "envoice", False),
        ("envoice.*", "envoice.a.b", False),
        ("*", "envoice", True),
        ("*", "envoice.paid", False),
        ("*.paid", "envoice.paid", True),
        ("#", "envoice", True),
        ("#", "a.b.c", True),
        ("envoice.#", "envoice", True),
        ("envoice.#", "envoice.a.b", True),
        ("envoice.#", "github.a", False),
        ("#.paid", "paid", True),
        ("#.paid", "envoice.paid", True),
        ("#.paid", "envoice.paid.late", False),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.#.b", "a.x.c", False),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b.c", True),
        ("#.#", "a", True),
        ("envoice.new_*", "envoice.new_manual_payment", True),
        ("envoice.new_*", "envoice.paid", False),
        ("envoice.*_payment", "envoice.new_manual_payment", True),
        ("envoice.new_*", "envoice.new_x.y", False),
        ("a+b.c", "aab.c", False),
        ("a?.c", "ab.c", False),
    ],
)
def test_event_matches(pattern: str, routing_key: str, expected: bool) -> None:
    assert event_matches(pattern, routing_key) is expected


# --- the command line fails on a bad config ---------------------------------------------------

SOURCE_TOML = """
[[sources]]
name = "envoice"
path = "/webhooks/envoice"
scheme = "envoice"
secrets = [{secrets}]
"""
HANDLER_TOML = """
[[handlers]]
name = "billing"
events = [{events}]
{target}
"""


def toml(
    *,
    secrets: str = '"literal"',
    events: str = '"envoice.#"',
    target: str = 'url = "http://127.0.0.1:9/hooks"',
    extra: str = "",
) -> str:
    return textwrap.dedent(
        extra
        + SOURCE_TOML.format(secrets=secrets)
        + HANDLER_TOML.format(events=events, target=target)
    )


def run_relay(*args: str) -> subprocess.CompletedProcess[str]:
    # The broker is never reached: the config fails first.
    closed = {"RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}
    return support_run_relay(*args, env=closed, unset=("RELAY_TEST_UNSET",))


BAD_CONFIGS = {
    "unknown key": (toml(extra="[ingress]\nprot = 8080\n"), "ingress.prot"),
    "bad port": (toml(extra="[ingress]\nport = 70000\n"), "ingress.port"),
    "unset secret": (toml(secrets='"env:RELAY_TEST_UNSET"'), "sources[0].secrets[0]"),
    "no such event": (toml(events='"envoice.payed"'), "handlers[0].events[0]"),
    "url and call": (toml(target='url = "http://x/"\ncall = "a.b:c"'), "handlers[0].url"),
    "not TOML": ("[ingress\n", "not valid TOML"),
}


@pytest.mark.parametrize("command", [["ingress"], ["worker"], ["topology", "declare"]])
@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, command: list[str], text: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)

    result = run_relay(*command, "--config", str(path))

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"relay: config error: {path}: {key}")


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        ("relay_no_such_module.handlers:deliver", "cannot import"),
        ("relay.handlers:no_such_function", "cannot import"),
        ("os.path:join", "not an async function"),
    ],
)
def test_worker_with_unloadable_call_exits_2(tmp_path: Path, call: str, problem: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml(target=f'call = "{call}"'))

    result = run_relay("worker", "--config", str(path))

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"relay: config error: {path}: handlers[0].call: ")
    assert problem in lines[0]


def test_a_backfill_needs_the_archive() -> None:
    assert load(handler={"backfill": "30d"}).handlers[0].backfill == "30d"
    with raises_naming("handlers[0].backfill"):
        load(handler={"backfill": "30d"}, archive={"enabled": False})
    with raises_naming("handlers[0].backfill"):
        load(handler={"backfill": "a month"})
