"""The `relay` command: parses arguments, loads settings, configures logging, runs.

Errors are turned into exit codes here and nowhere else, by `EXIT_CODES`: 0 ok, 1 runtime
failure, 2 bad usage or config, 3 broker unreachable (commands that need it now; the servers
keep retrying instead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import prometheus_client
import structlog

from relay import __version__, config, ingress, processes, tracing, wire
from relay.console import app as console
from relay.errors import BrokerUnavailable, CannotListen, ConfigError, OptionError, RelayError
from relay.logging import configure
from relay.ops import bench, deadletters, replay, status, topology, trace
from relay.ops.send import send
from relay.replays import Replay
from relay.secrets import resolve_secret
from relay.settings import Settings, console_exposed, development_secrets_on_loopback_only
from relay.worker import Worker

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_BROKER = 3

# The first class an error is an instance of decides the exit code and the message's prefix.
EXIT_CODES: list[tuple[type[RelayError], int, str]] = [
    (ConfigError, EXIT_CONFIG, "config error: "),
    (BrokerUnavailable, EXIT_BROKER, "broker unreachable: "),
    (RelayError, EXIT_FAILURE, ""),
]

log = structlog.get_logger()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    if "check" in args:  # what one option says of another
        args.check(args)
    try:
        settings = config.load(args.config)
        args.log_level = args.log_level or args.default_log_level
        tracing.configure()  # before logging: log lines carry trace ids only while it is on
        configure(args.log_level)
        try:
            return _run(args.run(settings, args))
        except OptionError:
            raise
        except ConfigError as exc:  # found after loading: name the file, as loading does
            raise ConfigError(f"{Settings.path(args.config)}: {exc}") from None
    except RelayError as exc:
        code, prefix = next((c, p) for kind, c, p in EXIT_CODES if isinstance(exc, kind))
        print(f"relay: {prefix}{exc}", file=sys.stderr)
        return code
    except BrokenPipeError:  # `relay dlq list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="A webhook relay on RabbitMQ.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)  # before or after the command
    for options, default in ((parser, None), (common, argparse.SUPPRESS)):
        options.add_argument(
            "--config",
            default=default,
            help="the TOML config (default: $RELAY_CONFIG, else config/relay.toml)",
        )
        options.add_argument(
            "--log-level",
            choices=["debug", "info", "warning"],
            default=default,
            help="what to log (default: info; relay bench: warning)",
        )
    parser.set_defaults(default_log_level="info")  # a command's own: `relay bench` logs less

    def command(
        name: str, run: Callable[..., Awaitable[int]], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, allow_abbrev=False, parents=[common]
        )
        sub.set_defaults(run=run)
        return sub

    serve = command("ingress", _ingress, "Serve the webhook ingress.")
    serve.add_argument("--host", help="override ingress.host")
    serve.add_argument("--port", type=int, help="override ingress.port")
    serve.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="run N ingress processes on the port, each with its own broker connection (1)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, so that other relay ingress processes serve the same port "
        "(--processes sets it)",
    )
    worker = command("worker", _worker, "Deliver messages to handlers.")
    worker.add_argument("--handler", action="append", help="only this handler (repeatable)")
    worker.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics here (worker.metrics_port)"
    )
    run = command("run", _run_both, "Ingress and worker in one process, for development.")
    run.add_argument("--host", help="override ingress.host")
    run.add_argument("--port", type=int, help="override ingress.port")

    sender = command(
        "send", _send, "Sign and POST sample webhooks of a source's scheme to an ingress."
    )
    target = sender.add_mutually_exclusive_group()
    target.add_argument("--url", help="default: the config's ingress port and source path")
    target.add_argument(
        "--port",
        type=int,
        help="the ingress's port on 127.0.0.1, as given to `relay run --port` or "
        "`relay ingress --port` (default: ingress.port)",
    )
    sender.add_argument("--source", help="source name (default: the first source)")
    sender.add_argument(
        "--count",
        type=_not_negative,
        default=10,
        help="new webhooks to send (10; 0 only with --catch-up)",
    )
    sender.add_argument(
        "--invoices", type=_positive, default=3, help="ordering keys (invoices) to spread over (3)"
    )
    sender.add_argument(
        "--secret-env",
        metavar="NAME",
        help="sign with the secret in environment variable NAME instead of the config's",
    )
    sender.add_argument(
        "--first-id",
        type=_positive,
        metavar="N",
        help="the new webhooks' event ids are N, N+1, ... (default: from the clock, unique)",
    )
    sender.add_argument(
        "--record",
        type=Path,
        metavar="FILE",
        help="append one JSON line per new webhook once answered (order, id, invoice, key, event, "
        "occurred, occurred_at, answer): a history for --catch-up",
    )
    sender.add_argument(
        "--catch-up",
        type=Path,
        metavar="FILE",
        help="rehearse a provider's catch-up: first send every webhook recorded in FILE again, "
        "one at a time in its order, same id and body, signed now; then the --count new ones",
    )
    sender.add_argument(
        "--retry-for",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="retry a webhook answered 5xx or not at all, with backoff, for up to SECONDS after "
        "its first failure, its invoice's later webhooks waiting (0, the default: count it and "
        "go on)",
    )
    sender.add_argument(
        "--outage-catch-up",
        action="store_true",
        help="with --retry-for: once a webhook gets through after a failure, send every webhook "
        "sent so far again, in the order first sent, before going on (Envoice's rule: \"all "
        'activities, both past and present, in chronological order")',
    )
    sender.set_defaults(check=partial(_check_send, sender))
    sender.epilog = (
        "Rehearsing a provider's catch-up: `--first-id 1 --record FILE` sends a known history; "
        "`--catch-up FILE --count 20` sends all of it again (the relay should answer duplicate) "
        "and then 20 new ones; `--retry-for 60 --outage-catch-up` acts as Envoice does when the "
        "ingress is down for a while. Exit 0 when every new webhook was accepted and every one "
        "sent again was accepted or a duplicate, else 1."
    )

    bench.add_arguments(
        command("bench", _bench, "Load an ingress with signed webhooks: accepted/s, latency.")
    )

    topo = command("topology", _topology, "Declare or export relay's RabbitMQ topology.")
    topo.add_argument(
        "action",
        choices=["declare", "export"],
        help="declare: bring the broker to the config (creates what is missing, removes the "
        "bindings relay owns that the config no longer has, prints every change); export: "
        "RabbitMQ definitions JSON for the management UI's import",
    )
    topo.add_argument("--dry-run", action="store_true", help="declare: print the plan only")
    topo.add_argument(
        "--prune", action="store_true", help="declare: also delete queues no longer used, if empty"
    )

    again = command("replay", _replay, "Send a handler archived webhooks again, in key order.")
    again.add_argument("--handler", required=True, help="handler name: no other handler sees them")
    again.add_argument(
        "--since",
        required=True,
        help="accepted at or after: RFC 3339, or back from now (90m, 2h, 7d)",
    )
    again.add_argument("--until", help="accepted at or before (as --since); default: now")
    again.add_argument("--key", action="append", help="only this ordering key (repeatable)")
    again.add_argument(
        "--event",
        action="append",
        help="only routing keys matching this topic pattern (repeatable)",
    )
    again.add_argument(
        "--dry-run", action="store_true", help="count what it would send, per event; change nothing"
    )

    journey = command(
        "trace",
        _trace,
        "A webhook's journey: accepted when and by which source, and per handler that binds it "
        "delivered, dead-lettered or pending (from the archive and the outcome logs).",
    )
    traced = journey.add_mutually_exclusive_group(required=True)
    traced.add_argument("id", nargs="?", help="the webhook's message id (envoice:9001)")
    traced.add_argument("--key", help="the last webhooks of this ordering key instead (invoice:42)")
    journey.add_argument(
        "--last",
        type=_positive,
        help=f"--key: this many of its newest webhooks ({trace.LAST})",
    )
    journey.add_argument(
        "--since",
        default=trace.SINCE,
        help="search the archive from this acceptance time on: RFC 3339, or back from now "
        f"(90m, 2h, 7d; default {trace.SINCE}): the archive reads at about 2,000 messages/s",
    )
    journey.add_argument(
        "--json", action="store_true", help="one JSON object (--key: one per line, oldest first)"
    )

    page = command(
        "console",
        _console,
        "Serve the operators' web page: handler states, dead letters, journeys, replays.",
    )
    page.add_argument("--host", help="override console.host")
    page.add_argument("--port", type=int, help="override console.port")

    stat = command("status", _status, "Per handler: partitions, depth, consumers, state.")
    stat.add_argument("--json", action="store_true", help="machine-readable output")

    dlq = command("dlq", _dlq, "List, replay or purge a handler's dead letters.")
    dlq.add_argument(
        "action",
        choices=["list", "replay", "purge"],
        help="list: show them (id, key, event, attempts, age, reason), leaving them in place; "
        "replay: move them back to the handler's partitions, in their order; purge: delete them",
    )
    dlq.add_argument("--handler", required=True, help="handler name")
    dlq.add_argument(
        "--id",
        action="append",
        help="only the dead letter with this message id (repeatable); an id not there is an "
        "error, and replay and purge then change nothing",
    )
    dlq.add_argument(
        "--json", action="store_true", help="list: one JSON object per line, age in seconds"
    )
    dlq.add_argument("--limit", type=_positive, default=1000, help="list: at most this many (1000)")
    dlq.add_argument("--yes", action="store_true", help="purge: do not ask for confirmation")
    return parser


def _check_send(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.count == 0 and args.catch_up is None:
        parser.error("argument --count: 0 only with --catch-up")
    if args.retry_for < 0:
        parser.error("argument --retry-for: must not be negative")
    if args.outage_catch_up and not args.retry_for:
        parser.error("argument --outage-catch-up: needs --retry-for")


def _not_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _with_listen(settings: Settings, args: argparse.Namespace) -> Settings:
    listen = settings.ingress
    listen = replace(listen, host=args.host or listen.host, port=args.port or listen.port)
    development_secrets_on_loopback_only(settings.sources, listen)  # --host may leave loopback
    return replace(settings, ingress=listen)


def _stop_on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def _ingress(settings: Settings, args: argparse.Namespace) -> int:
    settings = _with_listen(settings, args)
    stopping = asyncio.Event()
    _stop_on_signals(stopping.set)
    if args.processes > 1:
        child = ["ingress", "--reuse-port", "--log-level", args.log_level]
        for flag, value in (
            ("--config", args.config),
            ("--host", args.host),
            ("--port", args.port),
        ):
            child += [flag, str(value)] if value is not None else []
        return await processes.supervise(args.processes, child, stopping)
    await ingress.serve(settings, stopping, reuse_port=args.reuse_port)
    log.info("ingress stopped")
    return EXIT_OK


async def _worker(settings: Settings, args: argparse.Namespace) -> int:
    worker = Worker(settings, args.handler)
    _stop_on_signals(worker.stop)
    port = args.metrics_port if args.metrics_port is not None else settings.worker.metrics_port
    if port is not None:
        host = settings.worker.metrics_host
        try:
            prometheus_client.start_http_server(port, addr=host)
        except OSError as exc:
            raise CannotListen(f"worker metrics on {host}:{port}: {exc.strerror}") from None
    await worker.async_run()
    log.info("worker stopped")
    return EXIT_OK


async def _run_both(settings: Settings, args: argparse.Namespace) -> int:
    settings = _with_listen(settings, args)
    worker = Worker(settings)
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        worker.stop()

    _stop_on_signals(stop)
    await asyncio.gather(ingress.serve(settings, stopping), worker.async_run())
    return EXIT_OK


async def _send(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.sources:
        raise ConfigError("sources: none configured")
    source = settings.source(args.source) if args.source else settings.sources[0]
    if args.secret_env:
        try:
            secret = resolve_secret(f"env:{args.secret_env}", "--secret-env")
        except ConfigError as exc:
            raise OptionError(str(exc)) from None
        source = replace(source, secrets=(secret,))
    port = args.port or settings.ingress.port
    url = args.url or f"http://127.0.0.1:{port}{source.path}"
    report = await send(
        source,
        url,
        count=args.count,
        invoices=args.invoices,
        first_id=args.first_id,
        record=args.record,
        catch_up=args.catch_up,
        retry_for=args.retry_for,
        outage_catch_up=args.outage_catch_up,
    )
    print(report.line())
    for error in report.errors[:5]:
        print(f"  {error}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILURE


async def _bench(settings: Settings, args: argparse.Namespace) -> int:
    return await bench.run(settings, args)


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    handler = settings.handler(args.handler)
    now = datetime.now(UTC)
    wanted = Replay.new(
        handler.name,
        replay.parse_time(args.since, now),
        until=replay.parse_time(args.until, now) if args.until else None,
        keys=tuple(args.key or ()),
        events=tuple(args.event or ()),
    )
    done = await replay.replay(settings, handler, wanted, dry_run=args.dry_run)
    for routing_key, count in sorted(done.queued.items()):
        print(f"{count:>8}  {routing_key}")
    total = done.queued.total()
    if args.dry_run:
        print(f"would replay {total} message(s) to {handler.name}")
    else:
        print(f"replay {done.replay}: queued {total} message(s) for {handler.name}")
    return EXIT_OK


async def _trace(settings: Settings, args: argparse.Namespace) -> int:
    if args.last is not None and args.key is None:
        raise OptionError("--last goes with --key")
    since = replay.parse_time(args.since, datetime.now(UTC))
    if args.key is None:
        journeys = [await trace.trace_id(settings, args.id, since)]
    else:
        journeys = await trace.trace_key(settings, args.key, since, args.last or trace.LAST)
    if args.json:
        for journey in journeys:
            print(orjson.dumps(journey.as_dict()).decode())
    else:
        print("\n\n".join(journey.render() for journey in journeys))
    return EXIT_OK


async def _console(settings: Settings, args: argparse.Namespace) -> int:
    page = console_exposed(
        replace(
            settings.console,
            host=args.host or settings.console.host,
            port=args.port if args.port is not None else settings.console.port,
        )
    )
    if not (page.token or page.read_token or page.public_read):
        raise ConfigError(
            "console: set token (operators), read_token (readers) or public_read = true: "
            "else nobody can use it"
        )
    stopping = asyncio.Event()
    _stop_on_signals(stopping.set)
    await console.serve(replace(settings, console=page), stopping)
    log.info("console stopped")
    return EXIT_OK


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    found = await status.status(settings)
    print(orjson.dumps(found.as_dict()).decode() if args.json else found.render())
    return EXIT_OK


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    handler = settings.handler(args.handler)
    if args.action == "list":
        letters = await deadletters.list_dead_letters(settings, handler, args.limit, args.id)
        _print_dead_letters(letters, as_json=args.json)
        return EXIT_OK
    if args.action == "purge" and not args.yes and not _confirm(handler.name, args.id):
        print("relay: purge cancelled", file=sys.stderr)
        return EXIT_FAILURE
    act = deadletters.replay if args.action == "replay" else deadletters.purge
    count = await act(settings, handler, args.id)
    print(f"{args.action}: {count} dead letter(s) of {handler.name}")
    return EXIT_OK


def _confirm(handler: str, ids: list[str] | None) -> bool:
    what = f"{len(ids)} dead letter(s)" if ids else "ALL dead letters"
    try:
        return input(f"Purge {what} of handler {handler}? [y/N] ").strip().lower() == "y"
    except EOFError:
        return False


def _print_dead_letters(letters: list[wire.DeadLetter], *, as_json: bool) -> None:
    now = datetime.now(UTC)
    for letter in letters:
        if as_json:
            print(letter.as_json(now).decode())
            continue
        age = letter.age_seconds(now)
        age_text = f"{age:.0f}s" if age is not None else "?"
        print(f"{letter.id}  {letter.key}  {letter.event}  attempts={letter.attempts}  "
              f"age={age_text}  {letter.reason}")  # fmt: skip
    if not as_json:
        print(f"{len(letters)} dead letter(s)")


async def _topology(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "export":
        sys.stdout.buffer.write(orjson.dumps(topology.export(settings), option=orjson.OPT_INDENT_2))
        sys.stdout.write("\n")
        return EXIT_OK
    changes = await topology.converge(settings, dry_run=args.dry_run, prune=args.prune)
    verb = "would change" if args.dry_run else "changed"
    for line in changes:
        print(line)
    print(f"{verb} {len(changes)} thing(s) on {settings.broker.safe_url}" if changes
          else f"relay topology on {settings.broker.safe_url} is as the config says")  # fmt: skip
    return EXIT_OK
