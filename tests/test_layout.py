"""The package's folders form layers: each imports only from the folders listed before it, and
no module reaches into another module's private names."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "contextblip_jax"
# Lowest first: a folder may import from itself and the folders before it.
LAYERS = ("models", "parallel", "storage", "data", "training", "evaluation", "run")


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    yield path, (rel.parts[0] if len(rel.parts) > 1 else None)


def _imports(tree: ast.AST):
  """(imported contextblip_jax module path, local alias or None) of every import."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("contextblip_jax."):
          yield a.name, a.asname
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module == "contextblip_jax" or node.module.startswith("contextblip_jax.")):
      for a in node.names:
        yield f"{node.module}.{a.name}", a.asname or a.name


def test_every_module_is_in_a_layer():
  top = sorted(p.name for p, folder in _modules() if folder is None)
  assert top == ["__init__.py", "aot.py", "error_page.py", "main.py", "results.py", "score.py"], top   # thin entry points
  folders = {folder for _, folder in _modules() if folder is not None}
  assert folders == set(LAYERS), folders ^ set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down(layer):
  allowed = set(LAYERS[:LAYERS.index(layer) + 1])
  bad = []
  for path, folder in _modules():
    if folder != layer:
      continue
    for name, _ in _imports(ast.parse(path.read_text())):
      target = name.split(".")[1]
      if target in LAYERS and target not in allowed:
        bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
  assert not bad, "\n".join(bad)


def test_no_private_names_of_other_modules():
  bad = []
  for path, _ in _modules():
    tree = ast.parse(path.read_text())
    aliases = set()
    for name, alias in _imports(tree):
      if name.rsplit(".", 1)[-1].startswith("_"):
        bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
      if alias:
        aliases.add(alias)
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")):
        bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} uses {node.value.id}.{node.attr}")
  assert not bad, "\n".join(bad)
