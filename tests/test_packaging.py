"""The built wheel holds every plugin module and every recipe."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_plugin_and_recipe(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("mtlkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    plugin_files = [p for p in (ROOT / "plugins").rglob("*") if p.is_file() and p.suffix in (".py", ".json")
                    and "__pycache__" not in p.parts]
    assert plugin_files
    for p in plugin_files:
        assert f"mtlkit/plugins/{p.relative_to(ROOT / 'plugins').as_posix()}" in names, p
    recipes = list((ROOT / "recipes").rglob("*.toml"))
    assert recipes
    for p in recipes:
        assert f"mtlkit/recipes/{p.relative_to(ROOT / 'recipes').as_posix()}" in names, p
    for p in (ROOT / "mtlkit").rglob("*.py"):
        assert f"mtlkit/{p.relative_to(ROOT / 'mtlkit').as_posix()}" in names, p
    # every folder under plugins/ is a package (setuptools' explicit list needs it)
    for d in [ROOT / "plugins", *[p for p in (ROOT / "plugins").rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        assert (d / "__init__.py").is_file(), d
    assert "mtlkit/plugins/__init__.py" in names
    assert not any(n.startswith("plugins/") for n in names)  # never a top-level 'plugins'


def test_requires_python_admits_only_versions_with_the_stdlib_modules_used():
    """Every standard-library module the package imports exists in its lowest allowed Python."""
    import ast
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    spec = tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
    lowest = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip()).groups())
    added_in = {"tomllib": (3, 11)}  # stdlib modules newer than 3.9 that the code may use
    for path in list((root / "mtlkit").rglob("*.py")) + list((root / "plugins").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                need = added_in.get(name.split(".")[0])
                assert need is None or lowest >= need, f"{path.name} imports {name} (Python {need}), requires-python {spec}"
