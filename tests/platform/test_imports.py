"""Services never import each other: they talk through gRPC and events only.

Walks every module under ``services/<a>/histoloop/<a>/`` and fails on an import of ``histoloop.<b>``
for another service ``<b>``. The one exception is simulation, which replays the round of
training and acquisition and so may import both. The shared library is
``services/common`` (``import histoloop``), open to every service.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SERVICES = Path(__file__).resolve().parents[2] / "services"
SERVICE_NAMES = sorted(
    p.name
    for p in SERVICES.iterdir()
    if p.is_dir() and p.name != "common" and (p / "histoloop" / p.name / "__init__.py").exists()
)
ALLOWED = {"simulation": {"training", "acquisition"}}


def _imported(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in a file (relative ones stay inside)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module == "histoloop":  # from histoloop import training
                out += [(node.lineno, f"histoloop.{alias.name}") for alias in node.names]
    return out


def test_the_walk_sees_every_service() -> None:
    assert {
        "annotation_store",
        "tiling",
        "embedding",
        "training",
        "prediction",
        "acquisition",
        "simulation",
    } <= set(SERVICE_NAMES)


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_no_service_imports_another(service: str) -> None:
    others = set(SERVICE_NAMES) - {service} - ALLOWED.get(service, set())
    found = []
    for path in sorted((SERVICES / service / "histoloop" / service).rglob("*.py")):
        for line, module in _imported(path):
            parts = module.split(".")
            if len(parts) >= 2 and parts[0] == "histoloop" and parts[1] in others:
                found.append(f"{path.relative_to(SERVICES)}:{line} imports {module}")
    assert not found, "\n".join(found)


def _module_name(path: Path) -> str:
    """``histoloop.training.heads.base`` for ``services/training/histoloop/training/heads/base.py``."""
    parts = path.relative_to(SERVICES).with_suffix("").parts[1:]  # drop the service root folder
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_resolves_by_its_path_without_installing() -> None:
    """The folders spell the import paths: with only the service roots on the path (no
    install, no ``package-dir`` map), the import system finds every module at its file.
    Resolution walks the packages with ``PathFinder`` alone, importing nothing."""
    import importlib.machinery

    roots = [str(p) for p in sorted(SERVICES.iterdir()) if (p / "histoloop").is_dir()]
    # modules of packages: not alembic's migration scripts, not the generated stubs
    files = sorted(
        p
        for p in SERVICES.glob("*/histoloop/**/*.py")
        if ((p.parent / "__init__.py").is_file() or p.parent.name == "histoloop")
        and p.relative_to(SERVICES).parts[2] != "v1"
    )
    assert len(files) > 100
    wrong = []
    for path in files:
        name = _module_name(path)
        search: list[str] | None = roots
        spec = None
        for depth in range(1, name.count(".") + 2):
            spec = importlib.machinery.PathFinder.find_spec(
                ".".join(name.split(".")[:depth]), search
            )
            if spec is None:
                break
            search = list(spec.submodule_search_locations or [])
        if spec is None or spec.origin is None or Path(spec.origin).resolve() != path.resolve():
            wrong.append(
                f"{name}: {spec.origin if spec else None} (expected {path.relative_to(SERVICES)})"
            )
    assert not wrong, "\n".join(wrong)
