"""The import directions the layout promises, checked by parsing every module's imports.

The folders are the layers (see the README's layout table): **core** is ``patchalign``'s flat
modules plus ``patchalign.render`` (plain torch: model, grouping, losses, checkpoints, text,
pretrained, ...); **data** (``patchalign.data``: shard schema, readers, data modules); **engine**
(``patchalign.engine``: builds shards); **training** (``patchalign.training``: LightningModules and
the CLI); **eval** (``patchalign.eval``); **tools** (``patchalign.tools``: demo, export, pictures,
benchmarks); and **zerokey**, a separate package on top of core. Each layer imports only the layers
listed for it in :data:`ALLOWED`. Imports are read with :mod:`ast`, so a function-level (lazy)
import counts as much as a module-level one: hiding an import in a function does not change which
layer needs which. No import cycle exists between any two modules, lazy imports included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO_ROOT, save_lightning_checkpoint

#: layer -> the layers it may import (itself included). ``entry`` is ``python -m patchalign``.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "data": frozenset({"core", "data"}),
    "engine": frozenset({"core", "data", "engine"}),
    "training": frozenset({"core", "data", "training"}),
    "eval": frozenset({"core", "data", "training", "eval"}),
    "tools": frozenset({"core", "data", "engine", "training", "eval", "tools", "zerokey"}),
    "zerokey": frozenset({"core", "zerokey"}),
    "entry": frozenset({"core", "data", "engine", "training", "eval", "tools", "entry"}),
}
#: Third-party packages core never imports (it stays plain torch; ``lightning`` is training's).
FORBIDDEN_THIRD_PARTY_IN_CORE = ("lightning", "pytorch_lightning")
#: ``patchalign.<folder>`` -> layer; every other ``patchalign.<module>`` is core.
FOLDER_LAYERS = {
    "render": "core",
    "data": "data",
    "engine": "engine",
    "training": "training",
    "eval": "eval",
    "tools": "tools",
}


def layer_of(module: str) -> str | None:
    """The layer of a first-party module name (``None`` for third-party names)."""
    parts = module.split(".")
    if parts[0] == "zerokey":
        return "zerokey"
    if parts[0] != "patchalign":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] == "__main__":
        return "entry"
    return FOLDER_LAYERS.get(parts[1], "core")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # fully qualified name imported (``pkg.mod`` or ``pkg.mod.attr``)
    line: int
    module_level: bool  # executed when the module is imported (not inside a function)

    def __str__(self) -> str:
        where = "module level" if self.module_level else "inside a function"
        return f"{self.module}:{self.line} imports {self.target} ({where})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports_of(path: Path, text: str | None = None) -> list[Import]:
    """Every import statement of one file, relative imports resolved, flagged module-level or not.

    ``text`` parses that source as if it stood at ``path`` (the checker's own test).
    """
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    out: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                out.extend(Import(name, a.name, child.lineno, module_level) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for a in child.names:
                    target = mod if a.name == "*" else f"{mod}.{a.name}"
                    out.append(Import(name, target, child.lineno, module_level))
            visit(child, inner)

    visit(tree, True)
    return out


def _all_imports() -> list[Import]:
    files = sorted((REPO_ROOT / "patchalign").rglob("*.py")) + sorted((REPO_ROOT / "zerokey").rglob("*.py"))
    return [imp for f in files if "__pycache__" not in f.parts for imp in _imports_of(f)]


def _names(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _modules() -> set[str]:
    files = list((REPO_ROOT / "patchalign").rglob("*.py")) + list((REPO_ROOT / "zerokey").rglob("*.py"))
    return {_module_name(f) for f in files if "__pycache__" not in f.parts}


def _resolve(target: str, modules: set[str]) -> str | None:
    """The module an import names: ``patchalign.model.EncoderConfig`` -> ``patchalign.model``."""
    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        if name in modules:
            return name
    return None


def test_the_parser_sees_relative_lazy_and_guarded_imports() -> None:
    """The checker itself: relative imports resolve, guarded ones count, lazy ones are flagged."""
    text = (
        "from . import io\nfrom ..eval import metrics\nimport lightning\n"
        "try:\n    import zerokey.views\nexcept ImportError:\n    pass\n"
        "def f():\n    from patchalign.training.modules import Stage2Module\n"
    )
    got = [(i.target, i.module_level) for i in _imports_of(REPO_ROOT / "patchalign/render/cameras.py", text)]
    assert got == [
        ("patchalign.render.io", True),
        ("patchalign.eval.metrics", True),
        ("lightning", True),
        ("zerokey.views", True),
        ("patchalign.training.modules.Stage2Module", False),
    ]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a node path (first == last), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph.get(root, ()))))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def _module_graph() -> dict[str, set[str]]:
    """importing module -> first-party modules it imports, lazy imports included."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for imp in _all_imports():
        target = _resolve(imp.target, modules)
        if target is not None and target != imp.module:
            graph.setdefault(imp.module, set()).add(target)
    return graph


def test_cycle_finder() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"a"}}) == ["a", "a"]


def test_layer_of_follows_the_folders() -> None:
    assert layer_of("patchalign.model") == "core"
    assert layer_of("patchalign.render.cameras") == "core"
    assert layer_of("patchalign.engine.sources.demo") == "engine"
    assert layer_of("patchalign.training.modules") == "training"
    assert layer_of("patchalign.tools.bench.gpu") == "tools"
    assert layer_of("zerokey.mllm.pointers") == "zerokey"
    assert layer_of("torch.nn") is None


def test_every_import_points_down_the_layers() -> None:
    """Each first-party import, lazy or not, goes to a layer its importer may use (:data:`ALLOWED`)."""
    modules = _modules()
    bad = []
    for imp in _all_imports():
        target = _resolve(imp.target, modules)
        if target is None:
            continue
        src, dst = layer_of(imp.module), layer_of(target)
        if dst not in ALLOWED[src]:
            bad.append(f"{src} -> {dst}: {imp}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_core_stays_plain_torch() -> None:
    bad = [
        str(i)
        for i in _all_imports()
        if layer_of(i.module) == "core" and _names(i.target, FORBIDDEN_THIRD_PARTY_IN_CORE)
    ]
    assert not bad, "core must not import Lightning:\n" + "\n".join(bad)


def test_benchmarks_live_in_tools_bench() -> None:
    """Every patchalign benchmark is a module of ``patchalign.tools.bench`` (ZeroKey's stay in zerokey)."""
    stray = sorted(
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "patchalign").rglob("*bench*.py")
        if "tools" not in p.relative_to(REPO_ROOT / "patchalign").parts[:1]
    )
    assert stray == [], f"benchmark modules outside patchalign/tools/bench/: {stray}"


def test_no_import_cycle_between_modules() -> None:
    """All imports between first-party modules, function-level ones included, form a DAG."""
    graph = _module_graph()
    assert graph, "the parser found no imports at all"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_has_the_expected_edges() -> None:
    """Guard against a checker that silently sees nothing: known real edges are present."""
    graph = _module_graph()
    assert "patchalign.grouping" in graph["patchalign.model"]
    assert "patchalign.model" in graph["patchalign.checkpoints"]
    assert "patchalign.losses" in graph["patchalign.training.modules"]


def test_reading_a_lightning_checkpoint_does_not_import_lightning(tmp_path: Path) -> None:
    """The direction rule holds at run time too: core reads a Lightning-format checkpoint alone."""
    from patchalign.model import EncoderConfig, PatchAlignEncoder

    cfg = EncoderConfig(
        trans_dim=16, depth=1, num_heads=2, num_groups=8, group_size=4, encoder_dims=16, head_dim=8
    )
    enc = PatchAlignEncoder(cfg)
    save_lightning_checkpoint(tmp_path / "last.ckpt", enc, global_step=3)
    code = (
        "import sys\nfrom patchalign.checkpoints import read_checkpoint\n"
        f"c = read_checkpoint({str(tmp_path / 'last.ckpt')!r})\n"
        "import patchalign.pretrained, patchalign.render\n"
        "print(c.kind, c.encoder_config.trans_dim, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'zerokey') or m.startswith('patchalign.eval') or m in "
        "('patchalign.training.modules', 'patchalign.training.cli')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["lightning", "16", "[]"]
