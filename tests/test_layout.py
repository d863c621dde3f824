"""The package's layout holds: no import cycle, a core that names no built-in benchmark,
built-in plugins found from the files alone (a broken one is an error), and CI running the
README's test command."""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

import pytest

from mtlkit import discovery, plugin_manager
from mtlkit.cli import main
from mtlkit.errors import PluginError

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ((ROOT / "mtlkit", "mtlkit"), (ROOT / "plugins", "mtlkit.plugins"))


# -- imports go one way ------------------------------------------------------------------------
def module_files() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package)} of the core and the built-in plugins."""
    out = {}
    for base, prefix in SOURCES:
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if base.name == "mtlkit" and parts[0] in ("plugins", "recipes"):  # links to the top-level folders
                continue
            is_pkg = parts[-1] == "__init__"
            out[".".join([prefix, *(parts[:-1] if is_pkg else parts)])] = (path, is_pkg)
    return out


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the modules it imports, anywhere in its file (a function-level import closes
    a cycle at run time just as well). A package's own import by its submodules is Python's
    doing, not an edge; nor is an import under ``if TYPE_CHECKING:`` (never run)."""
    graph = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                node.body = []  # type-only imports: the walk below no longer sees them
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for a in node.names:  # `from pkg import module` imports that module
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = import_graph(module_files())
    assert "mtlkit.runner" in graph["mtlkit.cli.run"]  # the graph sees function-level imports
    assert "mtlkit.plugins.decathlon.domains" in graph["mtlkit.plugins.decathlon.dataset"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_imports_neither_a_plugin_nor_the_cli():
    graph = import_graph(module_files())
    for name, targets in graph.items():
        if name.startswith("mtlkit.plugins"):
            assert not any(t.startswith("mtlkit.cli") for t in targets), (name, "a plugin leans on the CLI")
            continue
        assert not any(t.startswith("mtlkit.plugins") for t in targets), (name, "the core imports a plugin")
        if not name.startswith("mtlkit.cli") and name != "mtlkit.__main__":
            assert not any(t.startswith("mtlkit.cli") for t in targets), (name, "the core imports the CLI")


# -- the core names no built-in benchmark ------------------------------------------------------
BENCHMARKS = re.compile(r"decathlon|nyuv2|cityscapes|synthetic_scenes|imagenet12|omniglot", re.IGNORECASE)
DOC_KEYWORDS = ("description", "help")  # a pydantic field's or an argparse option's text is documentation


def code_without_docs(source: str) -> str:
    """``source`` without comments, docstrings and documentation strings."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            body[0] = ast.Pass()
        if isinstance(node, ast.keyword) and node.arg in DOC_KEYWORDS:
            node.value = ast.Constant(None)
    text = ast.unparse(tree)  # comments are not in the tree
    assert not any(t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(text).readline))
    return text


def test_the_core_names_no_builtin_data_set():
    hits = []
    for name, (path, _) in module_files().items():
        if name.startswith("mtlkit.plugins"):
            continue
        for line in code_without_docs(path.read_text(encoding="utf-8")).splitlines():
            if BENCHMARKS.search(line):
                hits.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not hits, "\n".join(hits)
    assert BENCHMARKS.search(code_without_docs('x = "nyuv2"  # a name in code is found\n'))


# -- built-in plugins are found, not listed ----------------------------------------------------
def plugin_files() -> list[str]:
    """The modules under plugins/ that define a hook implementation, read from the files."""
    out = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        parts = path.relative_to(ROOT / "plugins").with_suffix("").parts
        if any(p.startswith("_") for p in parts):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        decorated = [d for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) for d in node.decorator_list]
        if any(ast.unparse(d).split(".")[-1] == "hookimpl" for d in decorated):
            out.append(".".join(("mtlkit.plugins", *parts)))
    return out


def test_discovery_finds_exactly_the_plugin_files(fresh_pm):
    found = [m.__name__ for m in discovery.builtin_plugin_modules()]
    assert sorted(found) == plugin_files() and len(found) > 30
    assert sorted(n for n, source in fresh_pm.sources.items() if source == "builtin") == sorted(found)


def test_discovery_rules(tmp_path, monkeypatch):
    pkg = tmp_path / "probe_builtins"
    (pkg / "sub").mkdir(parents=True)
    impl = "from mtlkit import hookimpl\n\n@hookimpl\ndef register_heads(register):\n    pass\n"
    files = {"__init__.py": "", "good.py": impl, "plain.py": "X = 1\n",
             "_helper.py": "raise RuntimeError('a private helper is never imported by the walk')\n",
             "reexport.py": "from .good import register_heads  # noqa: F401\n",
             "sub/__init__.py": "", "sub/deep.py": impl}
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = [m.__name__ for m in discovery.builtin_plugin_modules("probe_builtins")]
    assert names == ["probe_builtins.good", "probe_builtins.sub.deep"]
    assert "probe_builtins._helper" not in sys.modules
    assert "probe_builtins.plain" in sys.modules  # imported, but not a plugin


@pytest.fixture
def broken_builtin(tmp_path, monkeypatch):
    """A built-in plugin that fails to import, slipped into the walk."""
    (tmp_path / "probe_broken_builtin.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real_walk = discovery._walk

    def walk(package, debug):
        yield from real_walk(package, debug)
        yield discovery._import("probe_broken_builtin", debug)

    monkeypatch.setattr(discovery, "_walk", walk)
    monkeypatch.setattr(plugin_manager, "_MANAGER", None)  # the next command starts a fresh manager
    yield
    sys.modules.pop("probe_broken_builtin", None)


def test_a_builtin_that_fails_to_import_is_an_error(broken_builtin, capsys):
    with pytest.raises(PluginError, match="probe_broken_builtin.*no_such_dependency_xyz"):
        plugin_manager.MtlkitPluginManager(load_entry_points=False)
    assert main(["list", "backbone"]) == 2  # not "unknown backbone" later: the command stops at once
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "built-in plugin 'probe_broken_builtin' failed to import" in lines[0]
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):  # --debug: its own traceback
        main(["--debug", "list"])


# -- CI runs the README's test command -----------------------------------------------------------
def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"Tests:\s*```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert "--durations=20" in command  # the slowest tests are printed
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci
