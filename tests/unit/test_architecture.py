"""The layering of STYLE.md, enforced: only `api/` touches the web framework, nothing imports `api` or
`cli`, engines know nothing of billing, keys or storage, `settings` and `types` are leaves every layer may
import, `protocol` knows no engine, and the chat routes reach money and storage only through services."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tokentill"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a lazy import is still an edge)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _names_from(path: Path, module: str) -> set[str]:
    """The names `path` takes from `module` with `from module import ...`."""
    return {
        alias.name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
    }


def _ours(imports: set[str]) -> set[str]:
    return {i for i in imports if i == "tokentill" or i.startswith("tokentill.")}


MODULES = sorted(p for p in SRC.rglob("*.py") if "migrations" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_layering(path: Path) -> None:
    package = path.relative_to(SRC).parts[0].removesuffix(".py")
    imports = _imports(path)
    framework = {i for i in imports if i.split(".")[0] in {"fastapi", "starlette", "uvicorn"}}
    if package not in {"api", "cli", "app"}:
        assert not framework, f"{path.name} imports the web framework: {framework}"
    if package not in {"cli", "app", "__main__"}:
        assert not {i for i in imports if i.startswith(("tokentill.cli", "tokentill.app"))}
    if package not in {"api", "app"}:
        assert not {i for i in imports if i.startswith("tokentill.api")}
    if package == "engines":
        forbidden = ("tokentill.billing", "tokentill.storage", "tokentill.auth", "tokentill.limits")
        assert not {i for i in imports if i.startswith(forbidden)}, (
            f"{path.name} reaches past the engine line"
        )
    if package == "protocol":
        assert not {i for i in imports if i.startswith("tokentill.engines")}, f"{path.name} imports engines"
    if package == "catalog":  # engines import the catalogue's ModelSpec; the other way would be a cycle
        assert not {i for i in imports if i.startswith("tokentill.engines")}, f"{path.name} imports engines"


# The chat routes parse and render; holds, ledger rows and stored rows are the services' business.
CHAT_PATH = ("api/routes.py", "api/completions.py", "api/sse.py")


@pytest.mark.parametrize("name", CHAT_PATH)
def test_chat_routes_reach_no_money_or_storage_internals(name: str) -> None:
    # The lifecycle owns claims, holds and settlement: a route that imported these would be doing it again.
    internals = ("tokentill.billing.ledger", "tokentill.storage", "tokentill.idempotency", "tokentill.chat")
    reached = {i for i in _imports(SRC / name) if i.startswith(internals)}
    assert not reached, f"{name} reaches into {reached}"


def test_settings_is_a_leaf() -> None:
    assert _ours(_imports(SRC / "settings.py")) <= {"tokentill.errors"}


def test_types_is_a_leaf() -> None:
    assert not _ours(_imports(SRC / "types.py"))


def test_domain_types_come_from_types() -> None:
    moved = {"Usage", "Message", "ImageInput", "TextDelta", "Finished", "EngineEvent", "FinishReason"}
    root = SRC.parents[1]
    for path in sorted([*MODULES, *(root / "tests").rglob("*.py"), *(root / "bench").rglob("*.py")]):
        taken = _names_from(path, "tokentill.engines.base") & moved
        assert not taken, f"{path} takes {taken} from engines.base: import them from tokentill.types"


def test_no_print_outside_cli() -> None:
    for path in MODULES:
        if path.relative_to(SRC).parts[0] == "cli":
            continue
        calls = [
            n
            for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        ]
        assert not calls, f"print() in {path}"
