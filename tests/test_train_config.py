"""The configs and psp_jax.train.config_checks: bad values fail early, naming the key."""

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from psp_jax import errors, experiment
from psp_jax.data import datasets
from psp_jax.models import codec
from psp_jax.train import config_checks
from psp_jax.train.config_checks import ConfigError

from helpers import ROOT, load_config, tiny_config


def validate(config):
  config_checks.validate(config, device_count=8, process_count=1)


@pytest.mark.parametrize('name', ['default', 'synthetic', 'ade20k', 'voc2012', 'cityscapes'])
def test_shipped_configs_are_valid_on_8_devices(name):
  validate(load_config(name))


def test_paper_configs_hold_the_published_recipe():
  expected = {  # (classes, crop, epochs, base_size) of hszhao/semseg's yaml files.
    'ade20k': (150, 473, 100, 512),
    'voc2012': (21, 473, 50, 512),
    'cityscapes': (19, 713, 200, 2048),
  }
  for name, (classes, crop, epochs, base_size) in expected.items():
    config = load_config(name)
    assert config.data.name == name and config.data.num_classes == classes
    assert (config.data.crop_size, config.num_epochs, config.eval.base_size) == (
      crop,
      epochs,
      base_size,
    )
    assert config.batch_size == 16 and config.model.depth == 50 and config.model.width == 64
    optim = config.optim
    assert (optim.base_lr, optim.momentum, optim.weight_decay, optim.power) == (
      0.01,
      0.9,
      1e-4,
      0.9,
    )
    assert (optim.head_lr_mult, optim.aux_weight, optim.loss_groups) == (10.0, 0.4, 8)
    assert tuple(config.data.scale_range) == (0.5, 2.0)
    assert tuple(config.data.rotate_range) == (-10.0, 10.0)
  ade = load_config('ade20k')
  assert config_checks.num_train_steps(ade, 20_210) == 100 * 1263  # max_iter of tool/train.py


def test_configs_agree_with_the_data_set_table():
  for name in datasets.BENCHMARKS:
    table = datasets.DATASETS[name]
    official, mmseg = load_config(name), load_config(f'mmseg_{name}')
    for config in (official, mmseg):
      assert config.data.name == name and config.data.num_classes == table.num_classes
    assert official.eval.base_size == table.base_size
    assert config_checks.crop_pair(official.data.crop_size) == table.crop
    assert config_checks.crop_pair(mmseg.data.crop_size) == table.mmseg_crop
    assert tuple(mmseg.eval.fit_scale) == tuple(mmseg.data.mmseg.scale) == table.mmseg_scale
    assert {key: mmseg.eval[key] for key in datasets.MMSEG_TEST} == datasets.MMSEG_TEST
  synthetic = load_config('synthetic')
  assert synthetic.data.num_classes == datasets.DATASETS['synthetic'].num_classes == 11


def parse_command_line(*args: str) -> flags.FlagValues:
  """train.py's --config flag parsed from `train.py --config=configs/synthetic.py ARGS`."""
  argv = ['train.py', f'--config={ROOT / "configs" / "synthetic.py"}', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, sys_argv=argv)
  values(argv)
  return values


def test_command_line_overrides_and_unknown_keys():
  values = parse_command_line('--config.optim.base_lr=0.5', '--config.model.width=8')
  assert values.config.optim.base_lr == 0.5 and values.config.model.width == 8
  with pytest.raises((flags.Error, AttributeError), match='base_lrr') as error:
    parse_command_line('--config.optim.base_lrr=0.5')
  assert 'Did you mean "base_lr"' in str(error.value)


def test_none_on_the_command_line_sets_a_tuple_key_to_none():
  # ml_collections reads None for a tuple key as (None,); errors.parse_flags makes it None.

  args = ['--config.data.rotate_range=None', '--config.data.scale_range', 'None']
  args.append('--config.eval.scales=(None)')
  values = parse_command_line(*args)
  assert values.config.data.rotate_range == (None,) and values.config.eval.scales == (None,)
  errors.none_overrides(['train.py', *args], values)
  assert values.config.data.rotate_range is None and values.config.data.scale_range is None
  assert values.config.eval.scales == (None,)  # only a literal None is taken for None
  # mmseg's configs keep rotate_range None yet tuple-typed, so it can still be overridden.
  argv = ['train.py', f'--config={ROOT / "configs" / "mmseg_ade20k.py"}']
  for arg, expected in (('--config.data.rotate_range=(-5.0, 5.0)', (-5.0, 5.0)), ('', None)):
    values = flags.FlagValues()
    full = [*argv, arg] if arg else argv
    config_flags.DEFINE_config_file('config', None, 'c', flag_values=values, sys_argv=full)
    values(full)
    assert values.config.data.rotate_range == expected


def test_a_typo_in_a_derived_config_fails():
  config = load_config('synthetic')
  with pytest.raises(AttributeError, match='base_lrr'):
    config.optim.base_lrr = 0.1  # Configs are locked: a misspelt key cannot be added.


@pytest.mark.parametrize(
  ('change', 'key'),
  [
    (lambda c: c.update(colour='red'), 'colour'),
    (lambda c: c.model.update(widht=4), 'model.widht'),
    (lambda c: c.optim.update(lr=0.1), 'optim.lr'),
    (lambda c: c.eval.update(scale=1.0), 'eval.scale'),
  ],
)
def test_unknown_keys_are_named(change, key):
  config = tiny_config()
  config.unlock()
  change(config)
  with pytest.raises(ConfigError, match=f'Unknown config key.*{key}'):
    validate(config)


@pytest.mark.parametrize(
  ('values', 'key', 'hint'),
  [
    (dict(batch_size=12), 'config.batch_size', 'not divisible by 8 devices'),
    (dict(batch_size=16, optim=dict(grad_accum_steps=4)), 'config.batch_size', 'multiple of 32'),
    (dict(data=dict(crop_size=33)), 'config.data.crop_size', 'at least 41'),
    (dict(model=dict(output_stride=16), data=dict(crop_size=80)), 'crop_size', 'at least 81'),
    (dict(optim=dict(loss_groups=3)), 'config.optim.loss_groups', 'must divide'),
    (dict(model=dict(dtype='int8')), 'config.model.dtype', 'one of'),
    (dict(data=dict(ignore_label=3)), 'config.data.ignore_label', 'real class'),
    (dict(data=dict(transfer_dtype='uint16')), 'config.data.transfer_dtype', "'uint8'"),
    # config.eval's other values are the inference's: tests/test_config_schema.py.
    (dict(eval=dict(batch_size=4)), 'config.eval.batch_size', 'multiple'),
    (dict(optim=dict(base_lr=0.0)), 'config.optim.base_lr', '> 0'),
    (dict(optim=dict(loss_normalization='valid')), 'config.optim.loss_normalization', 'all'),
    (dict(model=dict(bins=None)), 'config.model.bins', "bins='"),
  ],
)
def test_bad_values_are_named(values, key, hint):
  config = tiny_config()
  for section, value in values.items():
    if isinstance(value, dict):
      config[section].update(value)
    else:
      config[section] = value
  with pytest.raises(ConfigError, match=f'(?s){key}.*{hint}'):
    validate(config)


def test_each_gradient_step_needs_two_images_for_the_bin1_batchnorm():
  config = tiny_config()
  config.batch_size = 1
  with pytest.raises(ConfigError, match='config.batch_size.*>= 2 images'):
    config_checks.validate(config, device_count=1, process_count=1)
  config.model.use_ppm = False  # No pyramid, no bin-1 branch: one image is fine.
  config_checks.validate(config, device_count=1, process_count=1)


def test_bad_config_fails_before_anything_compiles(tmp_path, monkeypatch):
  def no_jit(*args, **kwargs):
    raise AssertionError('jax.jit was called before the config was checked')

  monkeypatch.setattr(jax, 'jit', no_jit)
  config = tiny_config()
  config.batch_size = 12
  with pytest.raises(ConfigError, match='config.batch_size'):
    experiment.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_model_kwargs_resolve_auto_dtype_per_platform():
  config = tiny_config()
  config.model.dtype = 'auto'
  assert codec.of_experiment(config, 'tpu')['dtype'] == 'bfloat16'
  kwargs = codec.of_experiment(config, 'cpu')
  assert kwargs['dtype'] == 'float32' and kwargs['num_classes'] == config.data.num_classes
  assert kwargs['bins'] == [1, 2, 3, 6]  # JSON-ready
