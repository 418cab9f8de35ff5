"""The layering of STYLE.md, enforced: only `api/` touches the web framework, nothing imports `api` or
`cli`, and engines know nothing of billing, keys or storage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "tokentill"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


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
