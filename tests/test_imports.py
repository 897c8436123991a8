"""Package layout: the installed packages, no import cycles between dllm_jax's modules, no
oversized modules.

The modules are the .py files of every package that pyproject.toml lists in [tool.setuptools]
`packages`, read from the folder [tool.setuptools.package-dir] maps it to (kernels/ installs as
`dllm_jax.kernels`), else from the folder its name spells. Every import statement counts, wherever
it stands (module level, inside a function, under an `if`): `import a.b` is an edge to a.b;
`from a.b import c` is an edge to a.b.c when that is a module, else to a.b; relative imports
resolve against the importing module's package. Importing a submodule is not counted as importing
its parent packages: Python runs their __init__ first, but a package that imports its own
submodules is the usual layout, not a cycle.

Size convention: a module file over 600 lines must say why in its module docstring, in a sentence
containing the words "over 600 lines because".
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600
SIZE_EXCUSE = "over 600 lines because"


def _setuptools() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dirs() -> dict[str, Path]:
  """Installed package name -> the folder its .py files come from."""
  conf = _setuptools()
  mapped = conf.get("package-dir", {})
  return {pkg: ROOT / mapped.get(pkg, pkg.replace(".", "/")) for pkg in conf["packages"]}


def _modules() -> dict[str, Path]:
  """Module name -> file, for every .py file that installs."""
  out = {}
  for pkg, folder in _package_dirs().items():
    for path in sorted(folder.glob("*.py")):
      out[pkg if path.name == "__init__.py" else f"{pkg}.{path.stem}"] = path
  return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
  """(module, imported names or [] for `import module`, line) of every import in the file."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(alias.name, [], node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        module = ".".join(base + ([module] if module else []))
      out.append((module, [alias.name for alias in node.names], node.lineno))
  return out


def _import_graph() -> tuple[dict[str, dict[str, str]], list[str]]:
  """({module: {imported module: "file:line"}}, imports of project names that are no module)."""
  modules = _modules()
  project = {name.split(".")[0] for name in modules}
  graph: dict[str, dict[str, str]] = {name: {} for name in modules}
  unresolved = []
  for name, path in modules.items():
    for module, names, line in _imports(name, path):
      if module.split(".")[0] not in project:
        continue
      where = f"{path.relative_to(ROOT)}:{line}"
      targets = {f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names or [""]}
      for target in targets - {name}:
        if target not in modules:
          unresolved.append(f"{where} imports {target}, which is not a module of the package")
        else:
          graph[name].setdefault(target, where)
  return graph, unresolved


def test_every_package_folder_is_listed():
  """The packages list is explicit (for the kernels/ mapping), so a new subpackage must join it."""
  dirs = _package_dirs()
  for pkg, folder in dirs.items():
    assert (folder / "__init__.py").is_file(), f"package {pkg}: {folder} has no __init__.py"
  listed = set(dirs.values())
  missing = [str(init.parent.relative_to(ROOT)) for init in sorted((ROOT / "dllm_jax").rglob(
      "__init__.py")) if init.parent not in listed]
  assert not missing, f"not in pyproject.toml [tool.setuptools] packages: {', '.join(missing)}"


def test_no_import_cycles():
  graph, unresolved = _import_graph()
  assert not unresolved, "\n".join(unresolved)
  # The mapped kernels/ folder is part of the graph, imports included.
  assert "dllm_jax.kernels.split_kv" in graph["dllm_jax.kernels.flash_attention_mgpu"]
  try:
    graphlib.TopologicalSorter(graph).prepare()
  except graphlib.CycleError as e:
    cycle = e.args[1][::-1]  # graphlib lists it against the edges' direction
    steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    raise AssertionError("import cycle:\n  " + "\n  ".join(steps)) from None


def test_kernels_imported_through_the_package():
  """Folders mapped into the package are never imported by their folder name (a top-level
  `kernels` would be the unrelated PyPI package of that name once installed)."""
  folders = {Path(d).parts[0] for d in _setuptools().get("package-dir", {}).values()}
  found = []
  for path in sorted([*ROOT.glob("dllm_jax/**/*.py"), *ROOT.glob("kernels/*.py"),
                      *ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py")]):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        modules = [node.module]
      else:
        continue
      found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {module}" for module in modules
                if module.split(".")[0] in folders]
  assert not found, "\n".join(found)


def test_long_modules_say_why():
  too_long = []
  for name, path in _modules().items():
    text = path.read_text()
    lines = len(text.splitlines())
    docstring = " ".join((ast.get_docstring(ast.parse(text)) or "").split())
    if lines > MAX_LINES and SIZE_EXCUSE not in docstring:
      too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
  assert not too_long, (f"modules over {MAX_LINES} lines without '{SIZE_EXCUSE} ...' in their "
                        f"docstring: {', '.join(too_long)}")
