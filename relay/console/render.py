"""Pages from templates (jinja2, every value escaped unless a template says otherwise, which
none does), and what they show that needs more than a template: bodies made readable and
bounded, links into RabbitMQ's management UI."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import jinja2
import orjson

from relay.settings import Settings

BODY_CHARS = 4000  # of a dead letter's body, shown at most (the rest is counted, not shown)

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("relay.console", "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,  # a misspelt name fails the page, not blanks it
    trim_blocks=True,
    lstrip_blocks=True,
)


def page(name: str, **context: Any) -> str:
    return _templates.get_template(name).render(**context)


def readable(body: bytes) -> str:
    """A body as text: JSON indented, anything else decoded as far as it goes; cut at
    BODY_CHARS, saying how much more there was."""
    try:
        text = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", errors="replace")
    if len(text) <= BODY_CHARS:
        return text
    return f"{text[:BODY_CHARS]}\n… {len(text) - BODY_CHARS} more characters not shown"


class QueueLinks:
    """A queue's page in RabbitMQ's management UI (console.management_ui, else where the
    management API answers)."""

    def __init__(self, settings: Settings) -> None:
        base = settings.console.management_ui or settings.broker.management_bases[0]
        self._base = f"{base.rstrip('/')}/#/queues/{quote(settings.broker.vhost, safe='')}/"

    def __call__(self, queue: str) -> str:
        return self._base + quote(queue, safe="")
