"""The package's layout: imports run one way, no cycle, no private names across modules, one
name per module; test modules share code through tests/helpers.py, never through each other.

  command lines (train.py, psp_jax.{evaluate,predict,convert,preflight,experiment,export},
  data.prepare)
    -> psp_jax.serving/                       (serving export: imports inference/, not train/)
    -> psp_jax.train/, psp_jax.inference/   (never each other)
      -> psp_jax.weights -> psp_jax.interop/ -> psp_jax.models/
      -> psp_jax.data/                        (never models/, train/, inference/)
      -> shared leaves: psp_jax.{paths, metrics, visualize, distributed, runtime, sizes,
         errors, config_schema} (models/ imports none of them: it stands alone)

Function-local imports count like top-level ones: laziness does not change the dependency.
"""

import ast
import pathlib
import subprocess

import pytest

from helpers import ROOT

PACKAGE = ROOT / 'psp_jax'
MAX_LINES = 450
COMMANDS = {'psp_jax.evaluate', 'psp_jax.predict', 'psp_jax.convert', 'psp_jax.preflight'}
COMMANDS |= {'psp_jax.experiment'}  # the training job: joins train/ and inference/
COMMANDS |= {'psp_jax.export'}  # serving export: psp_jax.serving
SHARED = {'psp_jax.paths', 'psp_jax.metrics', 'psp_jax.visualize', 'psp_jax.distributed'}
SHARED |= {'psp_jax.runtime', 'psp_jax.sizes', 'psp_jax.errors', 'psp_jax.digests'}
SHARED |= {'psp_jax.orbax_reads'}
SHARED |= {'psp_jax.config_schema'}  # the experiment config: train/ checks it, inference/ reads it
# room -> the rooms and modules it may import (besides itself and the shared leaves).
ALLOWED = {
  'psp_jax.models': set(),
  'psp_jax.interop': {'psp_jax.models'},
  'psp_jax.weights': {'psp_jax.interop', 'psp_jax.models'},
  'psp_jax.data': set(),
  'psp_jax.train': {'psp_jax.models', 'psp_jax.data', 'psp_jax.weights', 'psp_jax.interop'},
  'psp_jax.inference': {'psp_jax.models', 'psp_jax.data', 'psp_jax.weights', 'psp_jax.interop'},
  # Serving export reads checkpoints as inference does; nothing imports it but commands.
  'psp_jax.serving': {
    'psp_jax.models',
    'psp_jax.weights',
    'psp_jax.interop',
    'psp_jax.inference',
    'psp_jax.data',
  },
}
SHARED_ALLOWED = {'psp_jax.paths': set(), 'psp_jax.metrics': set(), 'psp_jax.visualize': set()}
SHARED_ALLOWED |= {'psp_jax.distributed': set(), 'psp_jax.runtime': set(), 'psp_jax.sizes': set()}
SHARED_ALLOWED |= {
  'psp_jax.errors': set(),
  'psp_jax.config_schema': set(),
  'psp_jax.digests': {'psp_jax.distributed'},  # its gather meets first (distributed.meet)
  'psp_jax.orbax_reads': set(),
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


MODULES = package_modules()


def resolve(name: str) -> str | None:
  """The psp_jax module an imported dotted name lives in (None outside the package)."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition('.')[0]
  return None


def imports_of(path: pathlib.Path) -> dict[str, set[str]]:
  """{imported psp_jax module: local names bound to it or taken from it}, anywhere in a file."""
  found: dict[str, set[str]] = {}
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if (target := resolve(alias.name)) is not None:
          found.setdefault(target, set())
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        # `from psp_jax.x import y`: y is a module of its own, or a name of psp_jax.x.
        submodule = f'{node.module}.{alias.name}'
        target = resolve(submodule if submodule in MODULES else node.module)
        if target is not None:
          found.setdefault(target, set()).add(alias.name)
  return found


def room_of(module: str) -> str:
  """The room (psp_jax.train, ...), shared module or command a module belongs to."""
  for room in ALLOWED:
    if module == room or module.startswith(room + '.'):
      return room
  return module


GRAPH = {name: set(imports_of(path)) - {name} for name, path in MODULES.items()}


def test_no_import_cycle():
  state: dict[str, int] = {}  # 1 visiting, 2 done
  stack: list[str] = []

  def visit(node: str) -> None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(GRAPH.get(node, ())):
      if state.get(nxt) == 1:
        cycle = stack[stack.index(nxt) :] + [nxt]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 2

  for module in sorted(GRAPH):
    if module not in state:
      visit(module)


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_run_one_way(module):
  if module in COMMANDS or module == 'psp_jax.data.prepare' or module == 'psp_jax':
    return  # Command lines may import any room.
  room = room_of(module)
  allowed = ALLOWED.get(room, SHARED_ALLOWED.get(room))
  assert allowed is not None, f'{module} is in no room: add it to tests/test_layout.py'
  shared = set() if room == 'psp_jax.models' else SHARED  # models/ stands alone.
  wrong = sorted(
    target
    for target in GRAPH[module]
    if room_of(target) != room
    and target not in shared
    and room_of(target) not in allowed
    and target != 'psp_jax'
  )
  assert not wrong, f'{module} ({room}) must not import {wrong}'


def module_bindings(path: pathlib.Path) -> dict[str, set[str]]:
  """{psp_jax module: the local names a file binds the module object to}."""
  found: dict[str, set[str]] = {}
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        if (submodule := f'{node.module}.{alias.name}') in MODULES:
          found.setdefault(submodule, set()).add(alias.asname or alias.name)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name in MODULES and alias.asname:
          found.setdefault(alias.name, set()).add(alias.asname)
  return found


def python_files_outside_tests() -> list[pathlib.Path]:
  files = list(PACKAGE.rglob('*.py')) + [ROOT / 'train.py']
  for folder in ('benchmarks', 'tools', 'configs'):
    files += (ROOT / folder).rglob('*.py')
  return sorted(files)


def private_uses(path: pathlib.Path) -> list[str]:
  """'module._name' for every private name of another psp_jax module this file uses."""
  tree = ast.parse(path.read_text())
  own = module_name(path) if path.is_relative_to(PACKAGE) else None
  bound: dict[str, str] = {}  # local name -> psp_jax module
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        if submodule in MODULES:
          bound[alias.asname or alias.name] = submodule
          if alias.name.startswith('_'):
            out.append(submodule)
        elif resolve(node.module) not in (None, own) and alias.name.startswith('_'):
          out.append(f'{node.module}.{alias.name}')
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if resolve(alias.name) and any(p.startswith('_') for p in alias.name.split('.')):
          out.append(alias.name)
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in bound
      and bound[node.value.id] != own
      and node.attr.startswith('_')
      and not node.attr.startswith('__')
    ):
      out.append(f'{bound[node.value.id]}.{node.attr}')
  return sorted(set(out))


@pytest.mark.parametrize(
  'path', python_files_outside_tests(), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_private_names_of_other_modules(path):
  assert not private_uses(path), f'{path.relative_to(ROOT)} uses private names'


def test_each_module_is_imported_under_one_name():
  """A module is bound to one local name in every file (package, tests, benchmarks, tools)."""
  names: dict[str, dict[str, str]] = {}  # module -> {local name: first file binding it}
  for path in python_files_outside_tests() + sorted((ROOT / 'tests').rglob('*.py')):
    for module, bound in module_bindings(path).items():
      for name in bound:
        names.setdefault(module, {}).setdefault(name, str(path.relative_to(ROOT)))
  twice = {module: seen for module, seen in names.items() if len(seen) > 1}
  assert not twice, f'modules imported under several names (name: a file): {twice}'


def imported_test_modules(path: pathlib.Path) -> set[str]:
  """The test_* modules a file imports (top level or in a function)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module.split('.')[0])
    elif isinstance(node, ast.Import):
      found.update(alias.name.split('.')[0] for alias in node.names)
  return {name for name in found if name.startswith('test_')}


def test_test_modules_import_no_other_test_module():
  """What two test modules share lives in tests/helpers.py (or torch_helpers.py), so running or
  reading one test module never runs another's collection, fixtures or marks."""
  imports = {
    str(path.relative_to(ROOT)): imported_test_modules(path)
    for path in sorted((ROOT / 'tests').glob('*.py'))
  }
  assert not {path: found for path, found in imports.items() if found}


@pytest.mark.parametrize(
  'path', sorted(PACKAGE.rglob('*.py')), ids=lambda p: str(p.relative_to(ROOT))
)
def test_modules_stay_small(path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, f'{path.relative_to(ROOT)} has {lines} lines: split it by topic'


def test_the_checks_catch_what_they_should(tmp_path):
  """The walkers themselves: a private use and a forbidden import are seen."""
  sample = PACKAGE / 'data' / 'pipeline.py'
  assert 'psp_jax.data.sources' in imports_of(sample)
  fake = tmp_path / 'fake.py'
  fake.write_text('from psp_jax.data import transforms\ntransforms._hidden(1)\n')
  assert private_uses(fake) == ['psp_jax.data.transforms._hidden']
  fake.write_text('from psp_jax.train import loop as train_lib\nimport psp_jax.train.loop as L\n')
  assert module_bindings(fake) == {'psp_jax.train.loop': {'train_lib', 'L'}}
  fake.write_text('def f():\n  from test_train import ROOT\n  import test_parity.x\n')
  assert imported_test_modules(fake) == {'test_train', 'test_parity'}
  assert room_of('psp_jax.train.loop') == 'psp_jax.train'
  assert 'psp_jax.inference' not in ALLOWED['psp_jax.train']


def test_a_test_not_marked_e2e_cannot_start_a_process():
  """tests/conftest.py keeps the tiers true: only e2e tests (left out of test-fast) start one."""
  with pytest.raises(AssertionError, match='not marked e2e'):
    subprocess.run(['true'], check=False)
