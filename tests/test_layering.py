"""The package's imports form a DAG that points down the declared layers.

Every module of ``mrcnn_jax`` is parsed (``ast``, nothing is imported) with all its imports,
those inside functions included, so a function-local import cannot hide a cycle. The test fails
on a cycle between modules, a cycle between packages, or an import that points up (or sideways
between two packages of one layer) in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterable, List, Set, Tuple

import pytest

PACKAGE = "mrcnn_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Bottom-up: a module may import its own package and any package of a lower layer. Packages of
# one layer stand beside each other and import neither way. A subpackage's ``__init__.py`` is
# part of that package. ``mrcnn_jax/__init__.py`` imports nothing, so a notebook that wants
# ``mrcnn_jax.ops`` pays for nothing else; ``mrcnn_jax/config.py`` assembles the data, model and
# train configs, which pulls in the training package.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("<root>",),                # mrcnn_jax/__init__.py
    ("ops",),                   # pure jnp functions
    ("modeling", "data"),       # Flax modules; tf.data input (never imports modeling)
    ("kernels",),               # platform-specific algorithms, chosen where a program is built
    ("run",),                   # mesh and sharding, checks, checkpoints, distributed start-up
    ("inference",),             # predictor, batched predict, mask pasting, visualisation
    ("evaluation",),            # COCO evaluation; evaluators are given a predict function
    ("training",),              # train state, step, loop
    ("<config>",),              # mrcnn_jax/config.py
    ("convert",),               # weight importers
    ("benchmarks",),            # benchmark and profiling logic
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
  parts = (PACKAGE,) + path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
  """The layer unit a module belongs to: its subpackage, or ``<root>`` / ``<config>``."""
  parts = module.split(".")
  if len(parts) == 1:
    return "<root>"
  if parts[1] == "config":
    return "<config>"
  return parts[1]


def discover(root: pathlib.Path = ROOT) -> Dict[str, pathlib.Path]:
  return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported_modules(path: pathlib.Path, module: str, modules: Set[str]) -> Set[str]:
  """The ``mrcnn_jax`` modules that ``path`` imports anywhere in its body."""
  is_package = path.name == "__init__.py"
  out: Set[str] = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolved against this module's package
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module or ""
      # `from a import b` imports the module a.b when there is one, else a name of a.
      targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                 for alias in node.names]
    else:
      continue
    for target in targets:
      # `import a.b.c` (or a name of a.b.c) reaches the deepest existing module of the path.
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target and target != module:
        out.add(target)
  return out


def import_graph(root: pathlib.Path = ROOT) -> Dict[str, Set[str]]:
  paths = discover(root)
  modules = set(paths)
  return {m: imported_modules(p, m, modules) for m, p in paths.items()}


def cycles(graph: Dict[str, Iterable[str]]) -> List[List[str]]:
  """Strongly connected components with more than one node (Tarjan), each sorted."""
  index: Dict[str, int] = {}
  low: Dict[str, int] = {}
  stack: List[str] = []
  on_stack: Set[str] = set()
  found: List[List[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def package_graph(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
  out: Dict[str, Set[str]] = {}
  for module, targets in graph.items():
    src = package_of(module)
    out.setdefault(src, set()).update(
        package_of(t) for t in targets if package_of(t) != src)
  return out


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
  bad = []
  for module, targets in sorted(graph.items()):
    src = package_of(module)
    for target in sorted(targets):
      dst = package_of(target)
      if dst != src and RANK[dst] >= RANK[src]:
        bad.append(f"{module} ({src}) imports {target} ({dst})")
  return bad


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_every_package_has_a_layer(graph):
  unplaced = sorted({package_of(m) for m in graph} - set(RANK))
  assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_no_cycle_between_modules(graph):
  assert not cycles(graph), cycles(graph)


def test_no_cycle_between_packages(graph):
  found = cycles(package_graph(graph))
  assert not found, found


def test_imports_point_down(graph):
  bad = upward_imports(graph)
  assert not bad, "\n".join(bad)


def test_root_imports_nothing(graph):
  assert not graph[PACKAGE], graph[PACKAGE]


def test_the_checks_can_fail(tmp_path):
  """A planted function-local upward import and a planted cycle are both caught."""
  pkg = tmp_path / PACKAGE
  for sub in ("ops", "run", "training"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "ops" / "boxes.py").write_text(
      "def f():\n  from mrcnn_jax.run import sharding\n  return sharding\n")
  (pkg / "run" / "sharding.py").write_text("from . import checks\n")
  (pkg / "run" / "checks.py").write_text("import mrcnn_jax.run.sharding\n")
  (pkg / "training" / "loop.py").write_text("from mrcnn_jax.run import checks, sharding\n")
  g = import_graph(pkg)
  assert g["mrcnn_jax.ops.boxes"] == {"mrcnn_jax.run.sharding"}
  assert g["mrcnn_jax.training.loop"] == {"mrcnn_jax.run.checks", "mrcnn_jax.run.sharding"}
  assert upward_imports(g) == [
      "mrcnn_jax.ops.boxes (ops) imports mrcnn_jax.run.sharding (run)"]
  assert cycles(g) == [["mrcnn_jax.run.checks", "mrcnn_jax.run.sharding"]]
  assert cycles(package_graph(g)) == []
  (pkg / "run" / "checks.py").write_text("from mrcnn_jax.training import loop\n")
  assert cycles(package_graph(import_graph(pkg))) == [["run", "training"]]
