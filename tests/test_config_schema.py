"""psp_jax/config_schema.py: one default per key, read directly; old configs upgraded in one
place; config.eval's values checked once, at start-up, by the inference that uses them."""

import ast
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from psp_jax import config_schema, errors, experiment, weights
from psp_jax.inference import evaluation, segmenter
from psp_jax.models import PSPNet
from psp_jax.train import config_checks

from helpers import ROOT, load_config, random_variables, tiny_config

# ----------------------------------------------------------------------------------------
# Every declared key is read directly: its default lives in the schema alone.


def declared_names(section: ml_collections.ConfigDict) -> set[str]:
  """Every key name of the schema, sections and leaves, at any depth."""
  out = set()
  for key, value in section.items():
    out.add(key)
    if isinstance(value, ml_collections.ConfigDict):
      out |= declared_names(value)
  return out


DECLARED = frozenset(declared_names(config_schema.get_config()))
SCHEMA = 'psp_jax/config_schema.py'
# (file, key): why a declared key's name is looked up with a fallback there.
ALLOWED_GETS = {
  ('psp_jax/interop/semseg.py', 'bins'): "a caller's model config: no bins = read the weights",
  ('psp_jax/interop/mmseg.py', 'bins'): "a caller's model config: no bins = read the weights",
  ('psp_jax/weights.py', 'num_classes'): "a file's model config: a backbone's has no classes",
  ('benchmarks/tpu_preflight.py', 'eval'): "a pre-flight report: 'eval' only with --eval",
  ('tools/tpu_launch.py', 'batch_size'): 'the --set overrides typed (standard library only)',
}


def scanned(root: pathlib.Path) -> list[pathlib.Path]:
  """The code that reads configs: the package, train.py, configs/, benchmarks/, tools/."""
  files = [*(root / 'psp_jax').rglob('*.py'), root / 'train.py']
  for folder in ('configs', 'benchmarks', 'tools'):
    files += (root / folder).rglob('*.py')
  return sorted(p for p in files if p != root / SCHEMA)


def fallback_reads(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, key) of every X.get('key', ...) and getattr(X, 'key', default) of a declared key."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.Call):
      continue
    func, key = node.func, None
    if isinstance(func, ast.Attribute) and func.attr == 'get' and node.args:
      key = node.args[0]
    elif isinstance(func, ast.Name) and func.id == 'getattr' and len(node.args) == 3:
      key = node.args[1]
    if isinstance(key, ast.Constant) and key.value in DECLARED:
      found.append((node.lineno, key.value))
  return sorted(found)


def second_defaults(root: pathlib.Path) -> list[str]:
  """'file:line: key' of each fallback read of a declared key under root, bar ALLOWED_GETS."""
  out = []
  for path in scanned(root):
    name = path.relative_to(root).as_posix()
    out += [f'{name}:{n}: {k!r}' for n, k in fallback_reads(path) if (name, k) not in ALLOWED_GETS]
  return out


def test_declared_keys_are_read_without_a_second_default():
  wrong = second_defaults(ROOT)
  assert not wrong, (
    f'{wrong}: read the key directly (config.eval.stride); its default is in '
    'psp_jax/config_schema.py, and config_schema.upgrade fills it into an old config.'
  )


def test_the_fallback_walker_sees_fallbacks_and_the_allowed_ones_exist(tmp_path):
  fake = tmp_path / 'fake.py'
  fake.write_text(
    "ev.get('stride', 0)\ngetattr(optim, 'min_lr', 0.0)\nos.environ.get('HOME')\n"
    "config.eval.stride\nd.get(key)\nm.get('model')\n"
  )
  assert fallback_reads(fake) == [(1, 'stride'), (2, 'min_lr'), (6, 'model')]
  for name, key in ALLOWED_GETS:  # No stale entry.
    assert key in [k for _, k in fallback_reads(ROOT / name)], (name, key)
  # A tree with a fallback in any scanned folder fails (main's planning.py had seven).
  for name in ('psp_jax/inference/x.py', 'benchmarks/x.py', 'tools/x.py', 'train.py'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("whole_multiple = ev.get('whole_multiple', 64)\n")
  assert second_defaults(tmp_path) == [
    f"{name}:1: 'whole_multiple'"
    for name in ('benchmarks/x.py', 'psp_jax/inference/x.py', 'tools/x.py', 'train.py')
  ]


# ----------------------------------------------------------------------------------------
# Old configs: a config.json written before a key existed reads as the key's default.

# Keys a config.json of the first training runs lacks (added to the schema later), and
# eval.whole_multiple, whose fallbacks had drifted (64 in planning, 1 in the config checks).
OLD_MISSING = (
  'eval.whole_multiple',
  'eval.resize',
  'eval.fit_scale',
  'eval.stride',
  'eval.clip_windows',
  'eval.average',
  'optim.min_lr',
  'optim.loss_normalization',
  'optim.skip_nonfinite_steps',
  'model.contract_dilation',
  'model.align_corners',
  'data.recipe',
  'data.mmseg',
)
TINY = dict(depth=18, width=8, head_channels=16, aux_channels=8)


def old_workdir(tmp_path: pathlib.Path, **changes) -> tuple[pathlib.Path, dict]:
  """A workdir with a tiny model and the config.json of an older version (OLD_MISSING gone)."""
  workdir = tmp_path / 'old'
  model_config = dict(num_classes=11, **TINY)
  weights.save_variables(workdir, random_variables(PSPNet(**model_config), seed=3), model_config)
  stored = json.loads(load_config('synthetic').to_json_best_effort())
  stored['model'].update(TINY)
  stored['data']['synthetic'].update(image_size=24, num_train=1, num_val=2)
  stored['data']['data_dir'] = str(tmp_path / 'tfds')
  for dotted in OLD_MISSING:
    section, key = dotted.split('.')
    del stored[section][key]
  for dotted, value in changes.items():
    section, key = dotted.split('.')
    stored[section][key] = value
  (workdir / weights.RUN_CONFIG_FILE).write_text(json.dumps(stored))
  return workdir, stored


def test_an_old_config_json_is_upgraded_and_evaluates_with_the_schema_defaults(tmp_path):
  workdir, stored = old_workdir(tmp_path)
  config = segmenter.run_config(workdir)
  schema = config_schema.get_config()
  for dotted in OLD_MISSING:
    section, key = dotted.split('.')
    assert config[section][key] == schema[section][key], dotted
  assert config.eval.whole_multiple == 64 and config.optim.loss_normalization == 'labelled'
  # What it has is kept, lists as stored.
  assert (config.data.name, config.eval.mode, config.eval.base_size) == ('synthetic', 'whole', 129)
  assert config.data.synthetic.image_size == 24 and list(config.data.scale_range) == [0.75, 1.5]
  assert config.is_locked  # A typo still fails: config.eval.strid = 1 raises.

  seg = segmenter.Segmenter.from_checkpoint(workdir)
  assert seg.inference.procedure.whole_multiple == 64 and seg.dataset == 'synthetic'
  labels = seg.predict(np.zeros((24, 30, 3), np.uint8))
  assert labels.shape == (24, 30)
  results = evaluation.evaluate(config, workdir, progress=False)
  assert results['setup']['whole_multiple'] == 64 and results['setup']['images'] == 2


def test_an_unknown_stored_key_is_named_and_model_keys_are_the_models(tmp_path):
  workdir, _ = old_workdir(tmp_path, **{'eval.strid': 3, 'model.bn_epsilon': 1e-3})
  with pytest.raises(errors.InvalidInputError, match=r'config\.json.*config\.eval\.strid'):
    segmenter.run_config(workdir)
  stored = json.loads((workdir / weights.RUN_CONFIG_FILE).read_text())
  del stored['eval']['strid']
  config = config_schema.upgrade(stored)
  assert config.model.bn_epsilon == 1e-3  # PSPNet's own argument: config_checks checks it.


# ----------------------------------------------------------------------------------------
# config.eval's values: checked once, by the inference, when training or evaluate starts.


@pytest.mark.parametrize(
  ('key', 'value', 'hint'),
  [
    ('resize', 'short_side', "one of \\('long_side', 'fit'\\)"),
    ('average', 'softmax', "one of \\('probs', 'logits'\\)"),
    ('stride', -1, '>= 0'),
    ('scales', (None,), "scales='"),
    ('fit_scale', (512,), "fit_scale='"),
    ('whole_multiple', 0, '>= 1'),
    ('protocol', 'voc', 'official'),
  ],
)
def test_a_bad_eval_value_is_refused_at_start_up_naming_the_key(
  tmp_path, monkeypatch, key, value, hint
):
  config = tiny_config()
  with config.ignore_type():
    config.eval[key] = value
  config_checks.validate(config, device_count=8, process_count=1)  # Not the training's to check.

  def no_jit(*args, **kwargs):
    raise AssertionError('jax.jit was called before the config was checked')

  monkeypatch.setattr(jax, 'jit', no_jit)
  match = f'(?s)config\\.eval\\.{key}.*{hint}'
  with pytest.raises(errors.InvalidInputError, match=match):
    experiment.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  with pytest.raises(errors.InvalidInputError, match=match):  # Before reading the checkpoint.
    evaluation.evaluate(config, tmp_path / 'no_such_checkpoint', progress=False)
