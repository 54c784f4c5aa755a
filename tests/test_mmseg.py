"""mmsegmentation's PSPNet: its layout (interop.torch_mmseg), parity, export, layout detection.

mmseg itself is never installed: the reference is interop.torch_mmseg, whose state_dict is
checked against the key lists of mmseg 1.2.2's pspnet_r50-d8 / r101-d8 (tests/data). Weights
are random and BatchNorm statistics calibrated then perturbed (test_parity.randomize), and
the Flax model is compared stage by stage, at 512x512 and 377x505, in float32 and float64.
"""

import copy
import functools
import json
import pathlib
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

# ruff: noqa: E402 (what follows imports torch: it comes after the skip)
torch = pytest.importorskip('torch')

from psp_jax import config_schema, weights
from psp_jax import convert as convert_cli
from psp_jax.data import classes
from psp_jax.inference import segmenter
from psp_jax.interop import mmseg, pth, semseg
from psp_jax.interop.torch_mmseg import TorchMMSegPSPNet
from psp_jax.models import PSPNet
from psp_jax.train import config_checks
from psp_jax.train.loop import load_init_checkpoint
from psp_jax.train.train_state import TrainState

from torch_helpers import compare_eval, errors, flax_model, nhwc, randomize

pytestmark = pytest.mark.torch
DATA = pathlib.Path(__file__).parent / 'data'
F32_BOUND, F64_BOUND = 1e-4, 1e-10
TINY = dict(num_classes=7, depth=50, width=8, head_channels=16, aux_channels=8)
SIZES = {'512x512': (512, 512), '377x505': (377, 505)}


def _mmseg_keys(depth: int) -> list[str]:
  lines = (DATA / f'mmseg_pspnet{depth}_keys.txt').read_text().splitlines()
  return [line for line in lines if line.strip() and not line.startswith('#')]


@pytest.mark.parametrize('depth', [50, 101])
def test_state_dict_keys_and_shapes_equal_mmseg(depth):
  with torch.device('meta'):
    model = TorchMMSegPSPNet(150, depth=depth)
  got = [f'{k}\t{tuple(v.shape)}' for k, v in model.state_dict().items()]
  assert got == _mmseg_keys(depth)  # same keys, shapes and order
  config = mmseg.infer_mmseg_config({k: v for k, v in model.state_dict().items()})
  assert config['stem'] == 'deep_v1c' and config['width'] == 64 and config['depth'] == depth
  assert config['contract_dilation'] is True and config['align_corners'] is False


@functools.cache
def tiny(**overrides) -> tuple[TorchMMSegPSPNet, dict, dict]:
  """(calibrated tiny mmseg PSPNet, its converted float32 variables, model config)."""
  kwargs = {**TINY, **overrides}
  model = randomize(TorchMMSegPSPNet(**kwargs), seed=5, calib_hw=65)
  variables, config = mmseg.from_mmseg_state_dict({'meta': {}, 'state_dict': model.state_dict()})
  config.update({k: v for k, v in overrides.items() if k == 'output_stride'})  # not in weights
  return model, variables, config


@pytest.mark.parametrize('size', list(SIZES))
def test_eval_float32_tiny(size):
  torch_model, variables, config = tiny()
  x = torch.randn(1, 3, *SIZES[size], generator=torch.Generator().manual_seed(1))
  compare_eval(torch_model, variables, flax_model(config), x, F32_BOUND, f'f32 mmseg tiny {size}')


def _compare_float64(torch_model, config, x, label):
  model64 = copy.deepcopy(torch_model).double()
  with jax.enable_x64(True):
    variables, _ = mmseg.from_mmseg_state_dict(model64.state_dict(), config)
    compare_eval(model64, variables, flax_model(config, jnp.float64), x, F64_BOUND, label)


@pytest.mark.parametrize('size', list(SIZES))
def test_eval_float64_tiny(size):
  torch_model, _, config = tiny()
  gen = torch.Generator().manual_seed(2)
  x = torch.randn(1, 3, *SIZES[size], generator=gen, dtype=torch.float64)
  _compare_float64(torch_model, config, x, f'f64 mmseg tiny {size}')


def test_eval_float64_classic_stem_output_stride_16():
  """mmseg's r50b (7x7 conv1/bn1) at output stride 16: layer4 block 0 at dilation 1."""
  torch_model, _, config = tiny(stem='classic', output_stride=16)
  assert config['stem'] == 'classic'
  assert 'backbone.conv1.weight' in torch_model.state_dict()
  assert torch_model.backbone.layer4[0].conv2.dilation == (1, 1)
  assert torch_model.backbone.layer4[1].conv2.dilation == (2, 2)
  x = torch.randn(1, 3, 61, 83, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
  _compare_float64(torch_model, config, x, 'f64 mmseg classic os16')


@pytest.mark.slow  # 19-25 s on 2 cores: a float64 train forward, op by op.
def test_train_forward_float64_aux():
  """Train mode (batch statistics, dropout off): main and aux logits, every stage, and the
  running statistics after one step."""
  torch_model, _, config = tiny()
  torch_model = copy.deepcopy(torch_model).double()
  for m in torch_model.modules():
    if isinstance(m, torch.nn.Dropout2d):
      m.p = 0.0
  x = torch.randn(2, 3, 57, 70, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
  with jax.enable_x64(True):
    variables, _ = mmseg.from_mmseg_state_dict(torch_model.state_dict(), config)
    torch_model.train()
    with torch.no_grad():
      want = torch_model(x, return_intermediates=True)
    model = flax_model(config, jnp.float64, dropout_rate=0.0)
    (logits, aux), state = model.apply(
      variables,
      jnp.asarray(nhwc(x)),
      train=True,
      rngs={'dropout': jax.random.key(0)},
      mutable=['batch_stats', 'intermediates'],
    )
    acts = {k: v[0] for k, v in state['intermediates'].items()}
    acts.update(logits=logits, aux_logits=aux)
    for name in ('layer0', 'layer1', 'layer2', 'layer3', 'layer4', 'ppm', 'cls', 'aux'):
      rel, _ = errors(acts[name], nhwc(want[name]))
      assert rel <= F64_BOUND, (name, rel)
    for name in ('logits', 'aux_logits'):
      rel, _ = errors(acts[name], nhwc(want[name]))
      assert rel <= F64_BOUND, (name, rel)
    exported = mmseg.to_mmseg_state_dict(
      {'params': variables['params'], 'batch_stats': state['batch_stats']}, config
    )
  for key, value in torch_model.state_dict().items():
    if 'running' in key:
      rel, _ = errors(exported[key].numpy(), value.numpy())
      assert rel <= F64_BOUND, (key, rel)


@pytest.mark.slow
def test_eval_float32_pspnet50_full_size():
  """The zoo network itself (pspnet_r50-d8, 150 classes) at 512x512."""
  torch_model = randomize(TorchMMSegPSPNet(150), seed=50)
  variables, config = mmseg.from_mmseg_state_dict(
    {'meta': {}, 'state_dict': {f'module.{k}': v for k, v in torch_model.state_dict().items()}}
  )
  assert config['depth'] == 50 and config['stem'] == 'deep_v1c' and config['num_classes'] == 150
  x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(512))
  compare_eval(torch_model, variables, flax_model(config), x, F32_BOUND, 'f32 mmseg PSPNet-50')


def test_export_loads_strictly_and_round_trips():
  torch_model, variables, config = tiny()
  sd = mmseg.to_mmseg_state_dict(variables, config)
  assert list(sd) == list(torch_model.state_dict())  # mmseg's order
  fresh = TorchMMSegPSPNet(**TINY)
  fresh.load_state_dict(sd, strict=True)
  for key, value in torch_model.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
  again, config2 = mmseg.from_mmseg_state_dict(sd)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  # A model that is not mmseg's variant would be read back as another network: refused.
  with pytest.raises(semseg.CheckpointMismatchError, match='contract_dilation=False'):
    mmseg.to_mmseg_state_dict(variables, dict(config, contract_dilation=False))
  with pytest.raises(semseg.CheckpointMismatchError, match='align_corners=False'):
    semseg.to_torch_state_dict(variables, config)


def test_mismatches_are_listed_in_one_error():
  torch_model, _, _ = tiny()
  sd = dict(torch_model.state_dict())
  del sd['backbone.layer2.1.bn2.running_mean']
  sd['decode_head.extra.weight'] = torch.zeros(3)
  sd['decode_head.conv_seg.weight'] = torch.zeros(6, 16, 1, 1)
  with pytest.raises(semseg.CheckpointMismatchError) as info:
    mmseg.from_mmseg_state_dict({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, TINY)
  message = str(info.value)
  assert '1 missing keys:\n  backbone.layer2.1.bn2.running_mean' in message
  assert '1 unexpected keys:\n  decode_head.extra.weight' in message
  assert 'decode_head.conv_seg.weight: checkpoint (6, 16, 1, 1), model (7, 16, 1, 1)' in message
  with pytest.raises(semseg.CheckpointMismatchError, match='config says depth=101'):
    mmseg.from_mmseg_state_dict(torch_model.state_dict(), {'depth': 101})
  with pytest.raises(semseg.CheckpointMismatchError, match='BasicBlock dilates only'):
    mmseg.expected_mmseg_shapes(dict(TINY, depth=18))


def _zoo_file(path, model, names, palette, version='0.x', module=False):
  sd = {f'module.{k}' if module else k: v for k, v in model.state_dict().items()}
  if version == '0.x':
    meta = {'mmseg_version': '0.x', 'CLASSES': tuple(names), 'PALETTE': palette}
  else:
    meta = {'dataset_meta': {'classes': tuple(names), 'palette': palette}}
  torch.save({'meta': meta, 'state_dict': sd}, path)


NAMES = [f'thing{i}' for i in range(7)]
PALETTE = [[10 * i, 255 - i, 3 * i] for i in range(7)]


@pytest.mark.parametrize('version', ['0.x', '1.x'])
def test_layout_detected_by_convert_and_load_variables(tmp_path, capsys, version):
  torch_model, variables, config = tiny()
  _zoo_file(tmp_path / 'zoo.pth', torch_model, NAMES, PALETTE, version, module=True)
  loaded, loaded_config = weights.load_variables(tmp_path / 'zoo.pth')
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  assert loaded_config == config

  weights.convert(tmp_path / 'zoo.pth', tmp_path / 'dir')
  assert json.loads((tmp_path / 'dir' / weights.META_FILE).read_text()) == {
    'classes': NAMES,
    'palette': PALETTE,
  }
  ckpt = weights.load_checkpoint(tmp_path / 'dir')
  assert ckpt.model_config['align_corners'] is False and ckpt.dataset_meta['classes'] == NAMES
  # Back to a .pth: mmseg's layout by default (the model is mmseg's variant), meta kept.
  weights.convert(tmp_path / 'dir', tmp_path / 'back.pth')
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert back['meta']['dataset_meta'] == {'classes': NAMES, 'palette': PALETTE}
  assert back['meta']['CLASSES'] == NAMES
  TorchMMSegPSPNet(**TINY).load_state_dict(back['state_dict'], strict=True)
  with pytest.raises(SystemExit) as info:  # the command line: one readable line
    convert_cli.main([str(tmp_path / 'dir'), str(tmp_path / 'semseg.pth'), '--layout', 'semseg'])
  assert info.value.code == 1
  assert 'semseg checkpoints cannot hold' in capsys.readouterr().err


def test_class_names_reach_predict_and_evaluate(tmp_path, monkeypatch):
  torch_model, _, _ = tiny(num_classes=11)  # as many as the synthetic data set
  names = [f'label{i}' for i in range(11)]
  palette = [[i, 2 * i, 3 * i] for i in range(11)]
  _zoo_file(tmp_path / 'zoo.pth', torch_model, names, palette)
  # mmseg's test by default (an mmseg model, no run config); fit_scale kept small here.
  seg = segmenter.Segmenter.from_checkpoint(tmp_path / 'zoo.pth', fit_scale=(64, 48))
  got = seg.inference.procedure
  assert (got.mode, got.resize, got.fit_scale, got.flip, got.average) == (
    'whole',
    'fit',
    (64, 48),
    False,
    'logits',
  )
  assert seg.class_names == tuple(names)
  np.testing.assert_array_equal(seg.palette, np.array(palette, np.uint8))
  labels = seg.predict(np.zeros((37, 45, 3), np.uint8))
  assert labels.shape == (37, 45)
  named = segmenter.Segmenter.from_checkpoint(tmp_path / 'zoo.pth', dataset='synthetic')
  assert named.class_names == classes.CLASS_NAMES['synthetic']  # an explicit data set wins

  from psp_jax.inference import evaluation  # noqa: PLC0415

  seen = {}

  def fake_evaluate_model(config, apply_fn, variables, **kwargs):
    seen.update(kwargs)
    return evaluation.Evaluation({'ok': True}, [])

  monkeypatch.setattr(evaluation, 'evaluate_model', fake_evaluate_model)
  config = config_schema.get_config()
  config.data.num_classes = 11
  assert evaluation.evaluate(config, tmp_path / 'zoo.pth', progress=False) == {'ok': True}
  assert seen['class_names'] == names


def test_mmseg_variant_defaults_to_mmseg_test_settings():
  official = segmenter.InferenceConfig(base_size=512, crop_size=(473, 473))
  mmseg_test = segmenter.InferenceConfig(
    mode='whole',
    resize='fit',
    fit_scale=(2048, 512),
    crop_size=(512, 512),
    flip=False,
    average='logits',
    clip_windows=True,
    whole_multiple=1,
  )
  _, _, mmseg_config = tiny()
  assert segmenter.is_mmseg_variant(mmseg_config)
  assert segmenter.default_inference('ade20k', mmseg_config) == mmseg_test
  assert segmenter.default_inference(None, mmseg_config) == mmseg_test
  assert segmenter.default_inference('cityscapes', mmseg_config).fit_scale == (2048, 1024)
  # Either mark of the variant is enough (a converted dir records both).
  assert segmenter.is_mmseg_variant({'stem': 'deep_v1c'})
  assert segmenter.is_mmseg_variant({'stem': 'deep', 'align_corners': False})
  # The official network (or no model config) keeps tool/test.py's slide with flip.
  official_config = dict(TINY, stem='deep', align_corners=True)
  assert not segmenter.is_mmseg_variant(official_config)
  assert segmenter.default_inference('ade20k', official_config) == official
  assert segmenter.default_inference('ade20k') == official
  # The caller's settings win one by one; base_size alone asks for the long-side resize.
  got = segmenter.default_inference('ade20k', mmseg_config, flip=True, scales=(0.5, 1.0))
  assert (got.flip, got.scales, got.resize, got.mode) == (True, (0.5, 1.0), 'fit', 'whole')
  got = segmenter.default_inference('ade20k', mmseg_config, base_size=512)
  assert (got.resize, got.base_size, got.average) == ('long_side', 512, 'logits')


def test_unknown_layout_names_the_known_ones(tmp_path):
  assert pth.detect_layout(tiny()[0].state_dict()) == 'mmseg'
  assert pth.detect_layout(semseg.to_torch_names(tiny()[1])) == 'semseg'
  torch.save({'encoder.weight': torch.zeros(2)}, tmp_path / 'other.pth')
  with pytest.raises(semseg.CheckpointMismatchError) as info:
    weights.load_variables(tmp_path / 'other.pth')
  message = str(info.value)
  for layout in ('semseg PSPNet', 'mmseg PSPNet', 'ImageNet ResNet backbone', 'encoder.weight'):
    assert layout in message


class HistoryBuffer:  # stands in for mmengine's classes in a training checkpoint
  def __init__(self):
    self.values = [1.0]


def test_mmengine_training_checkpoint_is_refused_with_a_way_out(tmp_path):
  torch_model, _, _ = tiny()
  torch.save(
    {'meta': {}, 'state_dict': torch_model.state_dict(), 'message_hub': HistoryBuffer()},
    tmp_path / 'iter_80000.pth',
  )
  with pytest.raises(OSError, match='mmengine training checkpoint') as info:
    weights.load_variables(tmp_path / 'iter_80000.pth')
  assert 'HistoryBuffer' in str(info.value) and 'never unpickles them' in str(info.value)
  # Nothing that would run the file's code is advised (torch's own message suggests it).
  assert 'weights_only' not in str(info.value) and 'torch.load' not in str(info.value)


def test_torchs_advice_to_load_unsafely_is_never_relayed(tmp_path, monkeypatch):
  """torch.load's weights-only refusal suggests weights_only=False; our message drops it."""
  advice = (
    'Weights only load failed. This file can still be loaded, to do so you have two options. '
    '\n\t(1) ... Re-running `torch.load` with `weights_only` set to `False` will likely '
    'succeed, but it can result in arbitrary code execution.\n\t(2) ...\n\tWeightsUnpickler '
    'error: Unsupported operand 149\n\nCheck the documentation of torch.load ...'
  )

  def refuse(*args, **kwargs):
    raise pickle.UnpicklingError(advice)

  (tmp_path / 'x.pth').write_bytes(b'PK')
  monkeypatch.setattr(torch, 'load', refuse)
  with pytest.raises(OSError) as info:
    weights.load_variables(tmp_path / 'x.pth')
  assert str(info.value) == (
    f'{tmp_path}/x.pth is not a readable PyTorch checkpoint: UnpicklingError: Unsupported '
    'operand 149'
  )
  advice_only = 'Re-running `torch.load` with `weights_only` set to `False` will likely succeed'

  def refuse_with_advice_only(*args, **kwargs):
    raise RuntimeError(advice_only)

  monkeypatch.setattr(torch, 'load', refuse_with_advice_only)
  with pytest.raises(OSError) as info:
    weights.load_variables(tmp_path / 'x.pth')
  assert 'weights_only' not in str(info.value) and 'not tensors only' in str(info.value)


@pytest.mark.parametrize('prefix', ['', 'backbone.'])
def test_v1c_backbone_loads_as_init_checkpoint(tmp_path, prefix):
  """open-mmlab's resnet50_v1c (stem.*, layer*, fc.*), and mmpretrain's backbone.* names."""
  torch_model, _, _ = tiny()
  backbone = {f'{prefix}{k}': v for k, v in torch_model.backbone.state_dict().items()}
  fc = 'head.fc' if prefix else 'fc'
  backbone.update({f'{fc}.weight': torch.zeros(1000, 256), f'{fc}.bias': torch.zeros(1000)})
  torch.save({'state_dict': backbone}, tmp_path / 'resnet50_v1c.pth')
  loaded, config = weights.load_variables(tmp_path / 'resnet50_v1c.pth')
  assert config == dict(depth=50, stem='deep_v1c', width=8)
  assert set(loaded['params']) == {'backbone'}
  model = PSPNet(**TINY, stem='deep_v1c', contract_dilation=True, align_corners=False)
  images = jnp.zeros((1, 33, 33, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes))
  state = TrainState(jnp.int32(0), fresh['params'], fresh['batch_stats'], opt_state={})
  # What --config.init_checkpoint does with the file.
  state = load_init_checkpoint(state, str(tmp_path / 'resnet50_v1c.pth'))
  want = dict(torch_model.backbone.state_dict())
  named = semseg.to_torch_names({'params': state.params, 'batch_stats': state.batch_stats})
  np.testing.assert_array_equal(named['layer0.6.weight'], want['stem.6.weight'].numpy())
  want_var = want['layer4.2.bn3.running_var'].numpy()
  np.testing.assert_array_equal(named['layer4.2.bn3.running_var'], want_var)


def test_model_config_keys_are_validated():
  config = config_schema.get_config()
  assert config.model.stem == 'deep' and config.model.contract_dilation is False
  assert config.model.align_corners is True
  for key, value, message in (
    ('stem', 'wide', 'config.model.stem'),
    ('contract_dilation', 1, 'config.model.contract_dilation'),
    ('align_corners', 'no', 'config.model.align_corners'),
  ):
    bad = config_schema.get_config()
    # A config file may build config.model afresh: the types are then its own.
    bad.model = ml_collections.ConfigDict({**bad.model.to_dict(), key: value})
    with pytest.raises(config_checks.ConfigError, match=message):
      config_checks.validate(bad, device_count=1, process_count=1)
  bad = config_schema.get_config()
  bad.model.stem, bad.model.width = 'deep_v1c', 9
  with pytest.raises(config_checks.ConfigError, match='config.model.width'):
    config_checks.validate(bad, device_count=1, process_count=1)


def test_model_configs_written_before_the_options_mean_the_official_network():
  from psp_jax.train import loop  # noqa: PLC0415

  old = dict(TINY)  # a checkpoint's model_config from before contract_dilation/align_corners
  new = dict(TINY, stem='deep', contract_dilation=False, align_corners=True)
  assert loop._differences(old, new) == []  # an old workdir still resumes
  assert loop._differences(old, dict(new, align_corners=False)) == [
    'align_corners: checkpoint True, config False'
  ]
