"""The package's shape: no import cycles, no module using another's private
names, and a library that imports without the experiment layer."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dsv_jax")


def _modules() -> dict[str, ast.Module]:
  out = {}
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(PKG))[:-3]
        name = rel.replace(os.sep, ".").removesuffix(".__init__")
        with open(path) as fh:
          out[name] = ast.parse(fh.read(), path)
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The package module `name` refers to (a module or a name in one)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(tree: ast.Module) -> tuple[set[str], dict[str, str]]:
  """(modules imported anywhere in `tree`, local alias -> module)."""
  deps, aliases = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("dsv_jax"):
          deps.add(_resolve(a.name))
          aliases[a.asname or a.name] = _resolve(a.name)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
      "dsv_jax"
    ):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        target = full if full in MODULES else node.module
        deps.add(_resolve(target))
        if full in MODULES:
          aliases[a.asname or a.name] = full
  return deps - {None}, aliases


def test_no_module_uses_another_modules_private_names():
  offences = []
  for name, tree in MODULES.items():
    _, aliases = _imports(tree)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "dsv_jax"
      ):
        # A module's own private helper modules are named after it
        # (kkt -> _kkt_engine): the one private import allowed.
        own = f"_{name.rsplit('.', 1)[-1]}_"
        offences += [
          f"{name}: from {node.module} import {a.name}"
          for a in node.names
          if a.name.startswith("_")
          and not a.name.startswith("__")
          and not (
            a.name.startswith(own) and f"{node.module}.{a.name}" in MODULES
          )
        ]
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and aliases[node.value.id] != name
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
        offences.append(f"{name}: {node.value.id}.{node.attr}")
  assert not offences, offences


def test_there_is_no_import_cycle():
  graph = {name: _imports(tree)[0] - {name} for name, tree in MODULES.items()}
  # A package's __init__ importing its own submodules is how packages work;
  # a submodule importing its package back is a cycle like any other.
  for name in graph:
    graph[name] = {
      d for d in graph[name] if not (d.startswith(name + ".") and name != "")
    }
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for d in sorted(graph.get(n, ())):
      if state.get(d) == 1:
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d) :]))
      if d not in state:
        visit(d)
    stack.pop()
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      visit(n)


def test_the_walk_sees_the_package():
  # Guards the two tests above against passing on an empty walk.
  assert "dsv_jax.kkt" in MODULES and "dsv_jax.experiment.registry" in MODULES
  deps, _ = _imports(MODULES["dsv_jax.experiment.registry"])
  assert "dsv_jax.experiment.stages.train" in deps
