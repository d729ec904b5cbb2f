"""The package layout the architecture document promises (docs/ARCHITECTURE.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "prisma_ray"
STAGES = ("extract", "train", "evaluate", "interpret", "analysis", "campaign")
# The files that run a stage on Ray; every other module must be importable and testable without it.
RAY_FILES = {
    "extract/pipeline.py",
    "train/job.py",
    "evaluate/sweep.py",
    "interpret/pipeline.py",
    "interpret/autointerp/run.py",
}


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (absolute imports only; relative ones stay inside)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_one_folder_per_stage_and_few_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 7, f"loose modules at the package top: {loose}"
    for stage in (*STAGES, "runtime", "models", "data", "sae"):
        assert (PACKAGE / stage / "__init__.py").is_file(), f"prisma_ray/{stage}/ is a package"


def test_ray_is_imported_only_at_the_orchestration_layer():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("runtime/") or rel in RAY_FILES:
            continue
        if "ray" in _imported_modules(path):
            offenders.append(rel)
    assert not offenders, f"these modules import Ray outside runtime/ and the stage pipelines: {offenders}"


def test_architecture_document_names_every_folder():
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__"))
    missing = [f for f in folders if f"{f}/" not in doc]
    assert not missing, f"docs/ARCHITECTURE.md does not describe prisma_ray/{missing}"
    assert "docs/ARCHITECTURE.md" in (PACKAGE.parent / "README.md").read_text()


def test_test_files_have_unique_names():
    """pytest imports test files by basename (no packages under tests/): two of one name break collection."""
    names = sorted(p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py"))
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
