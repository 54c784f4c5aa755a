"""psp_jax.convert / checkpoint_io: official layout both ways, clear errors, backbones, CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, random_variables

torch = pytest.importorskip('torch')

from flax import traverse_util  # noqa: E402

from psp_jax import convert as convert_cli  # noqa: E402
from psp_jax import weights  # noqa: E402
from psp_jax.interop import semseg  # noqa: E402
from psp_jax.interop.torch_pspnet import TorchPSPNet  # noqa: E402
from psp_jax.models import PSPNet  # noqa: E402

pytestmark = pytest.mark.torch
DATA = pathlib.Path(__file__).parent / 'data'
TINY = dict(num_classes=5, depth=50, width=8, head_channels=16, aux_channels=8)


def random_torch_state_dict(seed: int = 0, **kwargs) -> dict:
  """state_dict of a TorchPSPNet whose every parameter and buffer is random."""
  torch.manual_seed(seed)
  sd = TorchPSPNet(**kwargs).state_dict()
  return {k: v if k.endswith('tracked') else torch.randn_like(v) for k, v in sd.items()}


def flat(tree: dict) -> dict:
  return traverse_util.flatten_dict(tree)


def assert_trees_equal(a: dict, b: dict) -> None:
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def _official_keys(depth: int) -> list[str]:
  lines = (DATA / f'semseg_pspnet{depth}_keys.txt').read_text().splitlines()
  return [line for line in lines if line.strip()]


@pytest.mark.parametrize(
  'kwargs',
  [
    TINY,
    dict(TINY, depth=18, stem='classic'),
    dict(TINY, depth=34, use_ppm=False),
    dict(TINY, bins=(1,), pool='max'),
    dict(TINY, reduce_dim=False),
  ],
  ids=['r50', 'r18-classic', 'r34-noppm', 'bin1', 'no-reduce'],
)
def test_flax_tree_is_the_official_layout_renamed(kwargs):
  """The Flax model's variables and psp_jax.convert's expectation agree leaf for leaf."""
  variables = random_variables(PSPNet(**kwargs))
  converted, config = semseg.from_torch_state_dict(random_torch_state_dict(**kwargs), kwargs)
  shape = lambda t: {k: tuple(v.shape) for k, v in flat(t).items()}
  assert shape(converted) == shape(variables)
  back, _ = semseg.from_torch_state_dict(semseg.to_torch_state_dict(variables, kwargs), kwargs)
  assert_trees_equal(back, variables)  # flax -> torch -> flax is exact
  for key in ('depth', 'num_classes', 'width', 'use_ppm', 'reduce_dim'):
    assert config[key] == kwargs.get(key, config[key])


@pytest.mark.slow
def test_full_pspnet50_official_keys_and_round_trip():
  variables = random_variables(PSPNet(150, depth=50))
  sd = semseg.to_torch_state_dict(variables)
  assert [f'{k} {tuple(v.shape)}' for k, v in sd.items()] == _official_keys(50)
  assert sd['layer0.1.num_batches_tracked'].dtype == torch.long
  with torch.device('meta'):
    official = TorchPSPNet(150, depth=50)
  official.load_state_dict(sd, strict=True, assign=True)  # the original's loader accepts it
  torch.testing.assert_close(official.cls[4].bias, sd['cls.4.bias'])
  back, config = semseg.from_torch_state_dict(sd)
  assert_trees_equal(back, variables)
  assert (config['depth'], config['num_classes'], config['width']) == (50, 150, 64)
  # Kernels are HWIO; the layout move is a transpose, not a reshape.
  np.testing.assert_array_equal(
    back['params']['backbone']['layer1']['0']['conv2']['kernel'][1, 2, 3, 4],
    sd['layer1.0.conv2.weight'][4, 3, 1, 2].numpy(),
  )


def test_prefix_wrapper_and_inference():
  sd = random_torch_state_dict(num_classes=21, depth=101, width=4, head_channels=8, aux_channels=4)
  plain, config = semseg.from_torch_state_dict(sd)
  wrapped = {'epoch': 100, 'state_dict': {f'module.{k}': v for k, v in sd.items()}}
  again, config2 = semseg.from_torch_state_dict(wrapped)
  assert_trees_equal(plain, again)
  assert config == config2
  assert config['depth'] == 101 and config['num_classes'] == 21 and config['width'] == 4
  assert (config['head_channels'], config['aux_channels'], config['bins']) == (8, 4, [1, 2, 3, 6])
  assert len(plain['params']['backbone']['layer3']) == 23
  bs = plain['batch_stats']['ppm']['3']['bn']
  np.testing.assert_array_equal(bs['var'], sd['ppm.features.3.2.running_var'].numpy())
  assert semseg.infer_model_config(sd) == config


@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
def test_infer_model_config_every_depth(depth):
  with torch.device('meta'):
    sd = TorchPSPNet(19, depth=depth, stem='deep', width=16, head_channels=32).state_dict()
  config = semseg.infer_model_config(sd)
  assert (config['depth'], config['num_classes'], config['width']) == (depth, 19, 16)
  assert (config['stem'], config['head_channels'], config['aux_channels']) == ('deep', 32, 256)


def test_bad_checkpoints_one_clear_error():
  sd = random_torch_state_dict(**TINY)
  bad = dict(sd)
  del bad['layer2.1.bn2.running_mean']
  bad['layer9.weight'] = torch.zeros(3)
  bad['cls.4.weight'] = torch.zeros(6, 16, 1, 1)  # a 6-class classifier
  bad['cls.4.bias'] = torch.zeros(6)
  with pytest.raises(semseg.CheckpointMismatchError) as info:
    semseg.from_torch_state_dict(bad, TINY)
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert '1 missing keys:\n  layer2.1.bn2.running_mean' in message
  assert '1 unexpected keys:\n  layer9.weight' in message
  assert '2 wrong shapes:\n  cls.4.weight: checkpoint (6, 16, 1, 1), model (5, 16, 1, 1)' in message
  assert 'cls.4.bias: checkpoint (6,), model (5,)' in message
  assert 'Hint: looks like a checkpoint of PSPNet-50 (num_classes=6' in message
  assert 'but the config says num_classes=5' in message

  sd101 = random_torch_state_dict(**dict(TINY, depth=101))
  with pytest.raises(semseg.CheckpointMismatchError, match='looks like a checkpoint of PSPNet-101'):
    semseg.from_torch_state_dict(sd101, dict(TINY, depth=50))
  with pytest.raises(semseg.CheckpointMismatchError, match='but the config says depth=50'):
    semseg.from_torch_state_dict({'module.' + k: v for k, v in sd101.items()}, {'depth': 50})
  with pytest.raises(semseg.CheckpointMismatchError, match='cannot recognise a ResNet'):
    semseg.from_torch_state_dict({'encoder.weight': torch.zeros(2)})
  # Leaves outside the naming contract are refused, not silently dropped.
  variables = random_variables(PSPNet(**TINY))
  variables['params']['cls']['extra'] = {'kernel': np.zeros((1, 1, 2, 2), np.float32)}
  with pytest.raises(semseg.CheckpointMismatchError, match='params/cls/extra/kernel'):
    semseg.to_torch_state_dict(variables)


def _backbone_file(stem: str, names: str, depth: int = 50) -> tuple[dict, dict]:
  """(ImageNet-style file, the official-named backbone tensors in it)."""
  sd = random_torch_state_dict(**dict(TINY, depth=depth, stem=stem))
  official = {k: v for k, v in sd.items() if k.startswith('layer')}
  stem_names = {v: k for k, v in semseg.BACKBONE_STEM.items()}
  out = {}
  for key, value in official.items():
    prefix = '.'.join(key.split('.')[:2])
    if names == 'top-level' and prefix in stem_names:
      key = f'{stem_names[prefix]}.{key.split(".", 2)[2]}'
    out[key] = value
  out['fc.weight'] = torch.zeros(1000, 8 * 8 * 4)
  out['fc.bias'] = torch.zeros(1000)
  return out, official


@pytest.mark.parametrize(
  'stem,names', [('deep', 'top-level'), ('deep', 'layer0'), ('classic', 'top-level')]
)
def test_load_backbone(stem, names):
  """resnet50_v2.pth (conv1..bn3 top level), layer0.* names, torchvision (7x7 conv1/bn1)."""
  file, official = _backbone_file(stem, names)
  if stem == 'classic':
    assert 'conv1.weight' in file and file['conv1.weight'].shape[-1] == 7
  model_vars = random_variables(PSPNet(**dict(TINY, stem=stem)), seed=1)
  loaded = semseg.load_backbone(model_vars, file)
  named = semseg.to_torch_names(loaded)
  for key, value in official.items():
    if not key.endswith('tracked'):
      np.testing.assert_array_equal(named[key], value.numpy(), err_msg=key)
  for head in ('ppm', 'cls', 'aux'):  # untouched
    assert_trees_equal(loaded['params'][head], model_vars['params'][head])

  with pytest.raises(semseg.CheckpointMismatchError, match='ImageNet ResNet-50 .* depth=101'):
    semseg.load_backbone(random_variables(PSPNet(**dict(TINY, depth=101, stem=stem))), file)
  file['layer5.0.weight'] = torch.zeros(1)
  with pytest.raises(semseg.CheckpointMismatchError, match='unexpected keys:\n  layer5.0.weight'):
    semseg.load_backbone(model_vars, file)


def test_load_variables_of_pth_files(tmp_path):
  sd = random_torch_state_dict(**TINY)
  torch.save({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, tmp_path / 'psp.pth')
  variables, config = weights.load_variables(tmp_path / 'psp.pth')
  assert_trees_equal(variables, semseg.from_torch_state_dict(sd)[0])
  assert config['depth'] == 50 and config['num_classes'] == 5
  PSPNet(**config)  # the config builds the model

  backbone, _ = _backbone_file('deep', 'top-level')
  torch.save(backbone, tmp_path / 'resnet50_v2.pth')
  variables, config = weights.load_variables(tmp_path / 'resnet50_v2.pth')
  assert set(variables['params']) == {'backbone'}
  assert config == dict(depth=50, stem='deep', width=8)

  (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(OSError, match='junk.pth is not a readable PyTorch checkpoint'):
    weights.load_variables(tmp_path / 'junk.pth')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    weights.load_variables(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='is not a checkpoint'):
    weights.load_variables(tmp_path)


def test_save_and_load_variables(tmp_path):
  variables = random_variables(PSPNet(**TINY))
  weights.save_variables(tmp_path / 'w', variables, dict(TINY, bins=(1, 2, 3, 6)))
  loaded, config = weights.load_variables(tmp_path / 'w')
  assert_trees_equal(loaded, variables)
  assert config == dict(TINY, bins=[1, 2, 3, 6])
  with pytest.raises(FileExistsError, match='force'):
    weights.save_variables(tmp_path / 'w', variables, TINY)


def test_load_variables_of_training_workdir(tmp_path):
  from psp_jax.train import checkpointing  # noqa: PLC0415
  from psp_jax.train.train_state import TrainState  # noqa: PLC0415

  variables = random_variables(PSPNet(**TINY))
  state = TrainState(
    step=jnp.int32(7),
    params=jax.tree.map(jnp.asarray, variables['params']),
    batch_stats=jax.tree.map(jnp.asarray, variables['batch_stats']),
    opt_state={'momentum': jax.tree.map(jnp.zeros_like, variables['params'])},
  )
  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=2, async_save=False)
  ckpts.save(state, dict(TINY))
  ckpts.close()
  loaded, config = weights.load_variables(tmp_path)
  assert_trees_equal(loaded, variables)
  assert config == TINY
  loaded, _ = weights.load_variables(tmp_path / 'checkpoints' / '7')
  assert_trees_equal(loaded, variables)


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', 'psp_jax.convert', *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=300,
  )


@pytest.mark.e2e
def test_cli_round_trip(tmp_path):
  sd = random_torch_state_dict(**TINY)
  torch.save({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, tmp_path / 'in.pth')
  done = _cli(str(tmp_path / 'in.pth'), str(tmp_path / 'ckpt'))
  assert done.returncode == 0, done.stderr
  config = json.loads((tmp_path / 'ckpt' / 'model_config.json').read_text())
  assert config['depth'] == 50 and config['num_classes'] == 5 and config['width'] == 8

  done = _cli(str(tmp_path / 'ckpt'), str(tmp_path / 'out.pth'))
  assert done.returncode == 0, done.stderr
  out = torch.load(tmp_path / 'out.pth', weights_only=True)
  assert list(out) == list(sd)
  for key, value in sd.items():
    if not key.endswith('tracked'):
      torch.testing.assert_close(out[key], value, rtol=0, atol=0)


def test_cli_errors(tmp_path, capsys):
  """Bad input exits 1 with one readable line (in-process: the subprocess path is above)."""
  sd = random_torch_state_dict(**TINY)
  torch.save(sd, tmp_path / 'in.pth')
  for argv, message in (
    ([str(tmp_path / 'missing.pth'), str(tmp_path / 'x')], 'no such file or directory'),
    ([str(tmp_path / 'in.pth'), str(tmp_path / 'y'), '--depth', '101'], 'config says depth=101'),
    ([str(tmp_path), str(tmp_path / 'z.pth')], 'is not a checkpoint'),
  ):
    with pytest.raises(SystemExit) as info:
      convert_cli.main(argv)
    assert info.value.code == 1
    assert message in capsys.readouterr().err
