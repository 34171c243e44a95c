"""The shape of the code: imports point one way, down the map of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "relay"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each relay module and the relay modules it imports (anywhere in it, functions and
    `if TYPE_CHECKING:` blocks too: a cycle only for type checking is still a cycle)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_no_module_imports_itself_round_a_cycle() -> None:
    graph = imports()

    cycles = [name for name in graph if name in reachable(graph, name)]

    assert cycles == []


def test_settings_import_nothing_of_relay_but_errors_and_secrets() -> None:
    assert imports()["relay.settings"] == {"relay.errors", "relay.secrets"}


def test_the_ingress_and_the_worker_never_import_the_operator_tools() -> None:
    graph = imports()

    for runtime in ("relay.ingress", "relay.worker", "relay.publisher"):
        tools = {m for m in reachable(graph, runtime) if m.startswith("relay.ops")}
        assert tools == set(), runtime


def test_providers_do_no_io() -> None:
    graph = imports()
    io_modules = {"relay.broker", "relay.publisher", "relay.ingress", "relay.worker"}

    providers = [m for m in graph if m.startswith("relay.providers")]

    assert "relay.providers.envoice" in providers  # else the loop below checks nothing
    for provider in providers:
        assert not reachable(graph, provider) & io_modules, provider


def test_relay_header_names_are_spelled_in_one_module() -> None:
    spelled = {
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if re.search(r"[\"']x-relay-", path.read_text(encoding="utf-8"))
    }

    assert spelled == {"relay.wire"}


def test_relay_and_the_example_services_do_not_import_each_other() -> None:
    """examples/ are services downstream of relay, as anyone's would be: they read the wire
    contract, not relay's code (their tests may use relay to send them deliveries)."""
    examples = list((ROOT / "examples").rglob("*.py"))
    assert examples  # else the check below checks nothing

    for path in [*PACKAGE.rglob("*.py"), *examples]:
        imported = {
            name.split(".")[0]
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            for name in (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom)
                else []
            )
        }  # fmt: skip
        other = "relay" if path.is_relative_to(ROOT / "examples") else "examples"
        assert other not in imported, path.relative_to(ROOT)


def test_no_module_is_named_for_what_it_is_not() -> None:
    names = {p.stem for p in PACKAGE.rglob("*.py")}

    assert not names & {"utils", "util", "common", "helpers", "misc", "manager"}


# Names of aiormq's and aiohttp's internals relay uses, and the one module each may be used in
# (tests/test_fences.py checks they are still there). `delivery_tag` is public on a message: only
# counting a channel's publishes with it is internal.
INTERNALS = {
    "relay._aiormq": {"confirmations", "message_id_delivery_tag", "write_queue",
                      "max_content_size", "ChannelFrame", "CONTENT_FRAME_SIZE",
                      "delivery_tag +=", "BLOCKED_HANDLER", "UNBLOCKED_HANDLER"},
    "relay._aiohttp": {"SERVER_SOFTWARE", "web_response", "output_size", "BaseSite", "_runner",
                       "_server", "_host", "_port", "_reuse_port", "_bound_port"},
}  # fmt: skip


def internals_used(path: Path) -> set[str]:
    """The names of INTERNALS in `path`, leaving out a class's own attributes (`self._port`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute):
            found.add(f"{node.target.attr} +=")
        elif isinstance(node, ast.Attribute):
            own = isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}
            found |= set() if own else {node.attr}
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.alias):
            found.add(node.name.rsplit(".", 1)[-1])
    return found & set().union(*INTERNALS.values())


def test_only_the_adapters_use_the_libraries_internals() -> None:
    used = {module_name(p): names for p in PACKAGE.rglob("*.py") if (names := internals_used(p))}

    assert used == INTERNALS
