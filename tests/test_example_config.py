"""config/example.toml agrees with relay/settings.py: it loads as a whole, names every option of
the settings model (set to the model's default, or commented out where the default is unset),
and no option the model does not know; the values it sets on purpose are named below."""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, Field, fields
from typing import Any

import pytest

from relay.config import load as load_config
from relay.providers import PROVIDERS
from relay.settings import (
    ArchiveSettings,
    BrokerSettings,
    ConsoleSettings,
    HandlerSettings,
    IngressSettings,
    RepeatsSettings,
    Settings,
    SourceSettings,
    WorkerSettings,
)
from tests.support import ROOT

EXAMPLE = ROOT / "config" / "example.toml"
SECTIONS: dict[str, type] = {
    "broker": BrokerSettings,
    "ingress": IngressSettings,
    "worker": WorkerSettings,
    "archive": ArchiveSettings,
    "repeats": RepeatsSettings,
    "console": ConsoleSettings,
    "sources": SourceSettings,
    "handlers": HandlerSettings,
}
# Fields that are no option of their own: broker.url given as a list, a source's scheme keys
# (checked against the scheme's options below), the handler's events as bindings
NOT_OPTIONS = {"broker": {"other_urls"}, "sources": {"options"}, "handlers": {"bindings"}}
# Values the example sets on purpose: any value will do, but the option must be there
EXAMPLES = {
    "sources": {"name", "path", "scheme", "secrets", "types"},
    "handlers": {"name", "events", "url", "call", "signing_secret"},
}
COMMENTED_OPTION = re.compile(r"^#\s*([a-z_]+)\s*=")
HEADER = re.compile(r"^\[\[?([a-z_.]+)\]\]?")


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))


def commented_options() -> dict[str, set[str]]:
    """Per section, the options written commented out (`# max_rate = 50`); of a list of tables
    (sources, handlers), those of its first entry."""
    found: dict[str, set[str]] = {}
    section: str | None = None
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        header = HEADER.match(line)
        if header:
            name = header[1]
            section = name if name in SECTIONS and name not in found else None
            if section is not None:
                found[section] = set()
        elif section is not None and (option := COMMENTED_OPTION.match(line)):
            found[section].add(option[1])
    return found


def options(model: type, section: str) -> dict[str, Field[Any]]:
    return {f.name: f for f in fields(model) if f.name not in NOT_OPTIONS.get(section, set())}


def default(field: Field[Any]) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING  # required: an example


def first_table(section: str) -> dict[str, Any]:
    table = example()[section]
    return table[0] if isinstance(table, list) else table  # type: ignore[no-any-return]


def test_the_sections_are_the_settings_model_s() -> None:
    assert set(SECTIONS) == {f.name for f in fields(Settings)}
    assert set(example()) == set(SECTIONS)


def test_the_example_loads_as_a_whole_and_its_sections_are_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RELAY_AMQP_URL", raising=False)
    monkeypatch.setenv("ENVOICE_API_SECRET", "from-env")
    monkeypatch.setenv("BILLING_WEBHOOK_SECRET", "whsec_c2VjcmV0")

    settings = load_config(EXAMPLE)

    assert settings.broker == BrokerSettings()
    assert settings.ingress == IngressSettings()
    assert settings.worker == WorkerSettings()
    assert settings.archive == ArchiveSettings()
    assert settings.repeats == RepeatsSettings()
    assert settings.console == ConsoleSettings()


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_option_is_in_the_example_with_the_model_s_default(section: str) -> None:
    table = first_table(section)
    commented = commented_options().get(section, set())
    examples = EXAMPLES.get(section, set())

    for name, field in options(SECTIONS[section], section).items():
        expected = default(field)
        if name in examples:
            assert name in table or name in commented, f"{section}.{name}: not in the example"
        elif name == "tolerance_seconds":  # a source's default is its scheme's
            expected = PROVIDERS[table["scheme"]].DEFAULT_TOLERANCE
            assert (type(table.get(name)), table.get(name)) == (int, expected), name
        elif expected is None:  # unset by default: TOML has no None, so commented out
            assert name not in table, f"{section}.{name}: set, though unset by default"
            assert name in commented, f"{section}.{name}: not in the example, even commented out"
        else:
            assert name in table, f"{section}.{name}: not in the example"
            # the same type too: 10 for a default of 10.0 reads as an integer option
            got = table[name]
            assert (type(got), got) == (type(expected), expected), f"{section}.{name}"


def test_the_example_s_scheme_options_are_the_scheme_s_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENVOICE_API_SECRET", "from-env")
    monkeypatch.setenv("BILLING_WEBHOOK_SECRET", "whsec_c2VjcmV0")
    source = first_table("sources")
    scheme_options = type(load_config(EXAMPLE).sources[0].options)
    examples = EXAMPLES["sources"]

    for field in fields(scheme_options):
        if not field.init or field.name in examples:
            continue
        assert source.get(field.name) == default(field), f"sources[0].{field.name}"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_example_names_no_option_the_model_does_not_know(section: str) -> None:
    known = set(options(SECTIONS[section], section)) | EXAMPLES.get(section, set())
    tables = example()[section]
    for i, table in enumerate(tables if isinstance(tables, list) else [tables]):
        scheme_keys = _scheme_keys(table["scheme"]) if section == "sources" else set()
        unknown = set(table) - known - scheme_keys
        assert not unknown, f"{section}[{i}]: the model knows no {sorted(unknown)}"
    unknown_commented = commented_options().get(section, set()) - known
    assert not unknown_commented, f"{section}: commented out, unknown {sorted(unknown_commented)}"


def _scheme_keys(scheme: str) -> set[str]:
    """The keys a scheme reads: the fields of its Options (a scheme without one reads none)."""
    options_class = getattr(PROVIDERS[scheme], "Options", None)
    return {f.name for f in fields(options_class) if f.init} if options_class else set()
