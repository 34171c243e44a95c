"""structlog set-up, done once by the CLI: JSON lines off a terminal, console on one."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.tracebacks import ExceptionDictTransformer

from relay import tracing

# Tracebacks without the frames' local variables: a secret or a payload may be one of them.
_TRACEBACKS = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


def configure(level: str = "info") -> None:
    on_terminal = sys.stdout.isatty()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if tracing.ON:  # so that logs and traces join
        processors.append(tracing.add_trace_id)
    renderer: structlog.typing.Processor
    if on_terminal:
        renderer = _console()
        factory: structlog.typing.WrappedLogger = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors.append(_TRACEBACKS)
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library: render those lines the same way.
    stdlib_processors: list[structlog.typing.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if not on_terminal:
        stdlib_processors.append(_TRACEBACKS)
    stdlib_processors.append(_console() if on_terminal else structlog.processors.JSONRenderer())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=stdlib_processors, foreign_pre_chain=processors[:3]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # A malformed HTTP request is the client's error: one warning line, no traceback.
    logging.getLogger("aiohttp.server").addFilter(_client_errors_as_warnings)
    # relay logs broker connection changes itself; aiormq would repeat them with tracebacks.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("aio_pika").setLevel(logging.ERROR)


def _client_errors_as_warnings(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError | ConnectionError):
        record.msg, record.args = f"bad HTTP request: {type(error).__name__}", ()
        record.levelno, record.levelname, record.exc_info = logging.WARNING, "WARNING", None
    return True


def _console() -> structlog.dev.ConsoleRenderer:
    # plain_traceback prints no locals (the rich formatter, if installed, would).
    return structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
