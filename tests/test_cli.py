"""The `relay` command: usage, exit codes, topology export/declare, send."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp.test_utils import TestServer

import relay
from relay import cli, config, wire
from relay.ingress import create_app, runner_options
from tests.conftest import AMQP_URL, MakeSettings
from tests.support import FakePublisher, relay_command, run_relay

CLOSED_BROKER = "amqp://guest:guest@127.0.0.1:1/"
COMMANDS = ["ingress", "worker", "run", "send", "bench", "topology", "trace", "console"]


def write_config(
    tmp_path: Path, *, exchange: str = "relay.activities", handler: str = "billing", extra: str = ""
) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(f"""
[broker]
exchange = "{exchange}"

[[sources]]
name = "envoice"
path = "/webhooks/envoice"
scheme = "envoice"
secrets = ["test-secret"]

[[handlers]]
name = "{handler}"
events = ["envoice.paid", "envoice.new_payment_with_*"]
url = "http://127.0.0.1:1/hooks"
partitions = 2
{extra}""")
    return str(path)


# --- usage ------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = run_relay("--help")

    assert result.returncode == 0
    assert result.stdout.startswith("usage: relay")
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command: str) -> None:
    result = run_relay(command, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: relay {command}")
    assert "--config" in result.stdout


def test_every_option_and_argument_is_described() -> None:
    def undescribed(parser: argparse.ArgumentParser, name: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    found += undescribed(sub, f"{name} {command}")
                found += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                found.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        return found

    assert undescribed(cli._parser(), "relay") == []
    usage = run_relay("--help")
    assert "--config" in usage.stdout
    assert "--log-level" in usage.stdout


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["worker"], "info"),
        (["ingress"], "info"),
        (["bench"], "warning"),  # its --e2e worker would log every delivery
        (["bench", "--log-level", "info"], "info"),
        (["--log-level", "debug", "worker"], "debug"),
    ],
)
def test_each_command_logs_at_its_own_default_level(argv: list[str], level: str) -> None:
    args = cli._parser().parse_args(argv)

    assert (args.log_level or args.default_log_level) == level


def test_version() -> None:
    result = run_relay("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"relay {relay.__version__}"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["topology"],
        ["topology", "drop"],
        ["send", "--count", "0"],
        ["send", "--invoices", "many"],
        ["ingress", "--port", "http"],
        ["worker", "--log-level", "loud"],
        ["--log-level", "loud", "worker"],
        ["worker", "--no-such-flag"],
        ["send", "--url", "http://127.0.0.1:1/webhooks/envoice", "--port", "1"],
        ["trace"],
        ["trace", "envoice:1", "--key", "invoice:1"],
        ["trace", "--key", "invoice:1", "--last", "0"],
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2(args: list[str]) -> None:
    result = run_relay(*args)

    assert result.returncode == 2
    assert "usage: relay" in result.stderr
    assert result.stdout == ""


# --- topology ---------------------------------------------------------------------------------


MANAGEMENT = "http://127.0.0.1:15672/api"


@pytest.mark.rabbit
async def test_topology_export_imports_into_a_fresh_vhost(tmp_path: Path) -> None:
    # Given a fresh vhost, and the export of a config whose broker.url names it
    vhost = f"relay-import-{uuid.uuid4().hex[:8]}"
    url = urlsplit(AMQP_URL)._replace(path="/" + vhost).geturl()
    result = run_relay("topology", "export", "--config", write_config(tmp_path),
                       env={"RELAY_AMQP_URL": url})  # fmt: skip
    assert result.returncode == 0, result.stderr
    definitions = json.loads(result.stdout)
    auth = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with aiohttp.ClientSession(headers=auth, raise_for_status=True) as api:
        await api.put(f"{MANAGEMENT}/vhosts/{vhost}")
        try:
            # When it is imported through the management API (the UI's "Import definitions")
            await api.post(f"{MANAGEMENT}/definitions", json=definitions)

            # Then the vhost has every relay object the export lists, dead-letter queue included
            found = {}
            for kind in ("exchanges", "queues", "bindings"):
                async with api.get(f"{MANAGEMENT}/{kind}/{vhost}") as response:
                    found[kind] = await response.json()
        finally:
            await api.delete(f"{MANAGEMENT}/vhosts/{vhost}")
    queues = {q["name"]: q for q in found["queues"]}
    assert queues.keys() == {q["name"] for q in definitions["queues"]}
    assert queues["relay.billing.dlq"]["type"] == "quorum"
    assert {q["name"] for q in found["queues"] if q["type"] == "classic"} == set()
    assert {e["name"] for e in definitions["exchanges"]} <= {e["name"] for e in found["exchanges"]}

    def key(b: dict[str, Any]) -> tuple[str, str, str, str]:
        return (
            b["source"],
            b["destination"],
            b["routing_key"],
            json.dumps(b["arguments"], sort_keys=True),
        )

    assert {key(b) for b in definitions["bindings"]} <= {key(b) for b in found["bindings"]}
    buckets = [b for b in definitions["bindings"] if "relay-bucket" in b["arguments"]]
    assert len(buckets) == 64  # each bucket bound to one partition


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_topology_export(tmp_path: Path) -> None:
    result = run_relay("topology", "export", "--config", write_config(tmp_path))

    assert result.returncode == 0, result.stderr
    definitions = json.loads(result.stdout)
    exchanges = by_name(definitions["exchanges"])
    assert exchanges.keys() == {"relay.activities", "relay.unrouted", "relay.billing"}
    assert exchanges["relay.activities"]["type"] == "topic"
    assert exchanges["relay.activities"]["arguments"] == {"alternate-exchange": "relay.unrouted"}
    assert exchanges["relay.unrouted"]["type"] == "fanout"
    assert exchanges["relay.billing"]["type"] == "headers"
    assert exchanges["relay.billing"]["arguments"] == {}

    queues = by_name(definitions["queues"])
    partitions = {"relay.billing.0", "relay.billing.1"}
    others = {"relay.billing.dlq", "relay.billing.outcomes", "relay.unrouted", "relay.state"}
    assert queues.keys() == partitions | others | {"relay.archive", "relay.ids"}
    for name in partitions:
        assert queues[name]["arguments"] == {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
        }
    assert queues["relay.unrouted"]["arguments"] == {"x-queue-type": "quorum"}
    assert queues["relay.billing.dlq"]["arguments"] == {"x-queue-type": "quorum"}
    assert queues["relay.state"]["arguments"]["x-queue-type"] == "stream"
    assert queues["relay.archive"]["arguments"] == {
        "x-queue-type": "stream",
        "x-max-age": "7D",
        "x-stream-max-segment-size-bytes": 100_000_000,
    }
    assert queues["relay.billing.outcomes"]["arguments"] == {
        "x-queue-type": "stream",
        "x-max-age": "30D",
        "x-stream-max-segment-size-bytes": 100_000_000,
    }
    assert queues["relay.ids"]["arguments"] == {
        "x-queue-type": "stream",
        "x-max-age": "2592000s",  # [repeats] horizon, 30 days
        "x-stream-max-segment-size-bytes": 100_000_000,
    }
    for item in definitions["exchanges"] + definitions["queues"]:
        assert (item["durable"], item["auto_delete"]) == (True, False)
        assert item["vhost"] == (urlsplit(AMQP_URL).path[1:] or "/")  # the suite's

    bindings = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in definitions["bindings"]
    }
    to_handler = {b for b in bindings if b[:3] == ("relay.activities", "relay.billing", "exchange")}
    assert {b[3] for b in to_handler} >= {"envoice.paid", "envoice.new_payment_with_stripe"}
    assert len(to_handler) == 16
    bucket_bindings = {
        int(b["arguments"]["relay-bucket"]): (b["destination"], b["arguments"]["x-match"])
        for b in definitions["bindings"]
        if b["source"] == "relay.billing"
    }
    assert bucket_bindings == {
        bucket: (f"relay.billing.{bucket % 2}", "all") for bucket in range(wire.BUCKETS)
    }
    assert ("relay.unrouted", "relay.unrouted", "queue", "") in bindings
    assert ("relay.activities", "relay.archive", "queue", "#") in bindings
    assert len(definitions["bindings"]) == 16 + wire.BUCKETS + 2


def test_topology_declare_with_broker_unreachable_exits_3(tmp_path: Path) -> None:
    result = run_relay(
        "topology",
        "declare",
        "--config",
        write_config(tmp_path),
        env={"RELAY_AMQP_URL": CLOSED_BROKER},
    )

    assert result.returncode == 3
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "broker" in lines[0]
    assert "guest:guest" not in result.stderr + result.stdout


def test_with_every_node_unreachable_the_error_names_each(tmp_path: Path) -> None:
    other = "amqp://guest:guest@127.0.0.1:2/"
    result = run_relay(
        "topology", "declare", "--config", write_config(tmp_path),
        env={"RELAY_AMQP_URL": f"{CLOSED_BROKER},{other}"},
    )  # fmt: skip

    assert result.returncode == 3
    assert "127.0.0.1:1/" in result.stderr
    assert "127.0.0.1:2/" in result.stderr
    assert "guest:guest" not in result.stderr + result.stdout


@pytest.mark.rabbit
def test_a_command_uses_the_first_node_that_answers(tmp_path: Path) -> None:
    config = write_config(tmp_path, exchange=f"relay.test-{uuid.uuid4().hex[:8]}")
    closed = urlsplit(AMQP_URL)._replace(netloc="guest:guest@127.0.0.1:1").geturl()  # same vhost
    result = run_relay(
        "topology", "declare", "--dry-run", "--config", config,
        env={"RELAY_AMQP_URL": f"{closed},{AMQP_URL}"},
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "+ exchange relay.test-" in result.stdout  # it read the broker: the exchange is missing


@pytest.mark.rabbit
async def test_topology_declare_creates_the_queues(
    tmp_path: Path, make_settings: MakeSettings, channel: AbstractChannel
) -> None:
    # Given settings with test-unique names (the fixture deletes what they name afterwards)
    settings = make_settings(
        handlers=[
            {"name": "billing", "events": ["envoice.paid"], "url": "http://x/", "partitions": 2}
        ]
    )
    handler = settings.handlers[0]
    config = write_config(tmp_path, exchange=settings.broker.exchange, handler=handler.name)
    env = {"RELAY_AMQP_URL": AMQP_URL}

    # When declared twice (idempotent)
    first, second = [
        await asyncio.to_thread(run_relay, "topology", "declare", "--config", config, env=env)
        for _ in range(2)
    ]

    # Then the first run creates everything and says so, the second finds nothing to do
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert f"+ queue relay.{handler.name}.0" in first.stdout.splitlines()
    assert f"+ bind relay.{handler.name} -> relay.{handler.name}.1 buckets 1 3 5" in first.stdout
    assert second.stdout.strip().endswith("is as the config says")

    # Then every queue and exchange exists
    for name in [*handler.queues, handler.dead_letter_queue]:
        await channel.declare_queue(name, passive=True)
    for name in (settings.broker.exchange, handler.exchange):
        await channel.declare_exchange(name, passive=True)
    assert [*handler.queues, handler.dead_letter_queue] == [
        f"relay.{handler.name}.0",
        f"relay.{handler.name}.1",
        f"relay.{handler.name}.dlq",
    ]


# --- send -------------------------------------------------------------------------------------


def test_send_to_nothing_listening_exits_1(tmp_path: Path) -> None:
    result = run_relay(
        "send",
        "--config", write_config(tmp_path),
        "--url", "http://127.0.0.1:1/webhooks/envoice",
        "--count", "3",
        "--invoices", "2",
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stdout.strip() == "sent 3: 3 failed"
    errors = result.stderr.splitlines()
    assert len(errors) == 3
    assert all(line.strip().startswith("ClientConnectorError: ") for line in errors)


async def test_send_port_targets_an_ingress_on_that_port(tmp_path: Path) -> None:
    # Given an ingress on a port of its own (as `relay run --port P` serves), not the config's
    path = write_config(tmp_path, extra='[ingress]\nhost = "127.0.0.1"\nport = 1\n')
    settings = config.load(path)
    publisher = FakePublisher()
    server = TestServer(create_app(settings, publisher), host="127.0.0.1")
    await server.start_server(**runner_options(settings.ingress))
    try:
        # When `relay send --port P` sends to it
        sent = await relay_command("send", "--config", path, "--port", str(server.port),
                                   "--count", "3")  # fmt: skip
        # and without --port, to the config's ingress.port
        default = await relay_command("send", "--config", path, "--count", "1")
    finally:
        await server.close()

    # Then the ingress on that port accepted them all, and the config's port was not used
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "sent 3: 3 accepted"
    assert len(publisher.published) == 3
    assert default.returncode == 1
    assert "127.0.0.1:1 " in default.stderr


def test_send_without_sources_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("[ingress]\nport = 8080\n")

    result = run_relay("send", "--config", str(path), "--url", "http://127.0.0.1:1/")

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"relay: config error: {path}: sources: none configured"]


def test_send_to_a_source_not_in_the_config_is_a_usage_error(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = run_relay("send", "--config", path, "--source", "nope")

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"relay: config error: {path}: no source named 'nope' in the config"
    ]


# --- exit codes -------------------------------------------------------------------------------


def test_a_busy_metrics_port_is_a_runtime_failure_not_the_broker(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_relay(
            "worker", "--config", write_config(tmp_path), "--metrics-port", str(port),
            env={"RELAY_AMQP_URL": CLOSED_BROKER},
        )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"relay: worker metrics on 127.0.0.1:{port}: Address already in use"
    ]


def test_a_console_nobody_could_use_is_a_config_error(tmp_path: Path) -> None:
    result = run_relay("console", "--config", write_config(tmp_path))

    assert result.returncode == 2
    assert "console: set token (operators), read_token (readers) or public_read" in result.stderr


def test_a_console_moved_off_loopback_refuses_the_development_token() -> None:
    # config/relay.toml's console listens on loopback with a development default token
    result = run_relay(
        "console", "--config", "config/relay.toml", "--host", "0.0.0.0",  # noqa: S104
        unset=("RELAY_CONSOLE_TOKEN",),
    )  # fmt: skip

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.endswith(
        "console.token: env:RELAY_CONSOLE_TOKEN is not set, and its development default is refused "
        "while console.host is '0.0.0.0' (not loopback)"
    )
    assert "dev-insecure-console" not in result.stderr


def test_a_busy_console_port_is_a_runtime_failure(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_relay(
            "console", "--config", write_config(tmp_path, extra="[console]\npublic_read = true\n"),
            "--port", str(port), env={"RELAY_AMQP_URL": CLOSED_BROKER},
        )  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"relay: console on 127.0.0.1:{port}: Address already in use"
    ]


def test_options_may_come_before_the_command(tmp_path: Path) -> None:
    result = run_relay("--config", write_config(tmp_path), "topology", "export")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queues"]


@pytest.mark.rabbit
def test_status_takes_its_options_before_the_command(tmp_path: Path) -> None:
    handler = f"status-{uuid.uuid4().hex[:8]}"  # only read: nothing is declared for it
    path = write_config(tmp_path, handler=handler)

    result = run_relay("--config", path, "--log-level", "warning", "status", "--json",
                       env={"RELAY_AMQP_URL": AMQP_URL})  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert [h["name"] for h in json.loads(result.stdout)["handlers"]] == [handler]


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (["worker", "--handler", "nope"], "no handler named 'nope' in the config"),
        (["dlq", "list", "--handler", "nope"], "no handler named 'nope' in the config"),
        (["send", "--source", "nope"], "no source named 'nope' in the config"),
    ],
    ids=["worker", "dlq", "send"],
)
def test_a_config_error_found_after_loading_names_the_file(
    tmp_path: Path, command: list[str], error: str
) -> None:
    path = write_config(tmp_path)

    result = run_relay("--config", path, *command, env={"RELAY_AMQP_URL": CLOSED_BROKER})

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"relay: config error: {path}: {error}"]


def test_a_command_line_option_error_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    result = run_relay("send", "--config", write_config(tmp_path), "--secret-env", "RELAY_NO_SUCH",
                       unset=("RELAY_NO_SUCH",))  # fmt: skip

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "relay: config error: --secret-env: environment variable RELAY_NO_SUCH is not set"
    ]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (CLOSED_BROKER, "Connection refused"),
        ("amqp://guest:wrong@127.0.0.1:5672/", "refused the login"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "refused vhost 'no-such-vhost'"),
    ],
    ids=["closed", "bad password", "missing vhost"],
)
def test_the_broker_refusing_a_command_is_exit_3_saying_why(
    tmp_path: Path, url: str, said: str
) -> None:
    config = write_config(tmp_path)

    result = run_relay("dlq", "list", "--handler", "billing", "--config", config,
                       env={"RELAY_AMQP_URL": url})  # fmt: skip

    assert result.returncode == 3
    [line] = result.stderr.splitlines()
    assert line.startswith("relay: broker unreachable: ")
    assert said in line
    assert "wrong" not in line


@pytest.mark.rabbit
@pytest.mark.parametrize(
    "command", [["status"], ["topology", "declare"], ["topology", "declare", "--dry-run"]],
    ids=" ".join,
)  # fmt: skip
def test_a_vhost_that_does_not_exist_is_exit_3_saying_so(
    tmp_path: Path, command: list[str]
) -> None:
    vhost = f"relay-missing-{uuid.uuid4().hex[:8]}"
    url = urlsplit(AMQP_URL)._replace(path="/" + vhost).geturl()

    result = run_relay(*command, "--config", write_config(tmp_path), env={"RELAY_AMQP_URL": url})

    assert result.returncode == 3, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("relay: broker unreachable: ")
    assert f"refused vhost {vhost!r}: it does not exist, or the user may not use it" in line
    assert "InvalidFrameError" not in line
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["ingress", "run"])
def test_host_override_off_loopback_refuses_the_development_secret(command: str) -> None:
    # config/relay.toml listens on loopback with a development default secret
    result = run_relay(
        command, "--config", "config/relay.toml", "--host", "0.0.0.0",  # noqa: S104
        unset=("ENVOICE_API_SECRET",), timeout=30,
    )  # fmt: skip

    assert result.returncode == 2
    assert "development default is refused while ingress.host is '0.0.0.0'" in result.stderr
    assert "dev-insecure-secret" not in result.stderr
