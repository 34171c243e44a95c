"""The documentation holds together, offline: every relative Markdown link in README.md, docs/
and the other pages points to a file that exists, every `#anchor` to a heading of its page (as
GitHub slugs headings), the README's quick start has exactly two set-up commands, the
second of which is the test command CI runs (.ci/run), and docs/OPERATIONS.md lists every
metric relay exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from relay import metrics
from tests.support import ROOT

PAGES = sorted(
    [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "deploy").glob("*.md"),
        *(ROOT / "examples").glob("*/README.md"),
    ]
)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(markdown: str) -> str:
    """The page without its fenced code blocks (a `# comment` there is not a heading)."""
    return FENCE.sub("", markdown)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page's headings; repeats get -1, -2, ... as on GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", prose(page.read_text("utf-8")), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(page.read_text("utf-8")))
        if not re.match(r"[a-z]+:", target)  # http:, https:, mailto:
    ]


def test_the_pages_are_found() -> None:
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/ARCHITECTURE.md", "deploy/README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, broken


def test_slugs_are_githubs() -> None:
    assert slug("Changing a handler's partitions") == "changing-a-handlers-partitions"
    assert slug("Memory: the archive and the outcome logs") == (
        "memory-the-archive-and-the-outcome-logs"
    )
    assert slug("`relay topology declare`, briefly") == "relay-topology-declare-briefly"


def test_the_quick_start_has_one_command_to_run_relay_and_one_to_test_it() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    quick_start = readme.split("\n## Quick start\n")[1].split("\n## ")[0]
    first_block = re.findall(r"```sh\n(.*?)```", quick_start, re.DOTALL)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]

    assert commands == ["deploy/run.sh", "deploy/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    assert "exec bash deploy/test.sh" in ci


def test_every_metric_is_listed_in_operations() -> None:
    exported = [m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    page = (ROOT / "docs" / "OPERATIONS.md").read_text("utf-8")
    # a counter's _name is without the _total it is exported (and listed) with
    listed = {name.removesuffix("_total") for name in re.findall(r"`(relay_[a-z_]+)`", page)}

    assert "relay_end_to_end_seconds" in exported  # else the check below checks little
    assert sorted(set(exported) - listed) == []
