"""Tests of psp_jax.predict (Segmenter and its PNGs) and psp_jax.visualize."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from psp_jax import visualize, weights
from psp_jax.data import classes
from psp_jax.inference.segmenter import Segmenter, list_images, predict_files, read_image
from psp_jax.inference.sliding_window import InferenceConfig
from psp_jax.models import PSPNet

from helpers import load_config, random_variables, semseg_test_reference

NUM_CLASSES = 21  # Recognised as PASCAL VOC: its palette and names.


@pytest.fixture(scope='module')
def tiny():
  model = PSPNet(num_classes=NUM_CLASSES, depth=18, width=8, head_channels=16, aux_channels=8)
  variables = random_variables(model, seed=1)
  # Centre the logits on a random probe so that the argmax is spread over several classes.
  probe = jnp.asarray(np.random.default_rng(0).normal(size=(2, 33, 45, 3)), jnp.float32)
  mean = jax.jit(model.apply, static_argnames='train')(variables, probe, train=False)
  mean = mean.mean(axis=(0, 1, 2))
  cls = dict(variables['params']['cls'])
  cls['conv2'] = dict(cls['conv2'], bias=cls['conv2']['bias'] - mean)
  return model, dict(variables, params=dict(variables['params'], cls=cls))


@pytest.fixture(scope='module')
def segmenter(tiny):
  model, variables = tiny
  procedure = InferenceConfig(crop_size=(33, 33), base_size=48, tile_size=32)
  return Segmenter(
    lambda v, x: model.apply(v, x, train=False),
    variables,
    num_classes=NUM_CLASSES,
    procedure=procedure,
  )


def test_colorize_uses_the_palette():
  palette = classes.PALETTES['voc2012']
  labels = np.random.default_rng(0).integers(0, 21, (7, 9))
  labels[0, :3] = 255
  rgb = visualize.colorize(labels, palette)
  assert rgb.dtype == np.uint8 and rgb.shape == (7, 9, 3)
  np.testing.assert_array_equal(rgb[1:], palette[labels[1:]])
  np.testing.assert_array_equal(rgb[0, :3], 0)  # Ignored pixels are black.
  with pytest.raises(ValueError, match=r'\[21\] outside the palette of 21'):
    visualize.colorize(np.full((2, 2), 21), palette)


def test_overlay_blends_and_keeps_ignored_pixels():
  palette = np.array([[200, 0, 100], [0, 50, 0]], np.uint8)
  image = np.full((2, 2, 3), 100, np.uint8)
  labels = np.array([[0, 1], [255, 0]])
  out = visualize.overlay(image, labels, palette, alpha=0.25)
  np.testing.assert_array_equal(out[0, 0], [125, 75, 100])  # 0.75 * 100 + 0.25 * colour
  np.testing.assert_array_equal(out[1, 0], [100, 100, 100])
  assert visualize.present_classes(np.array([[1, 1, 0], [255, 1, 3]]), 4) == [1, 0, 3]


def test_side_by_side_panels():
  a, b = np.zeros((5, 3, 3), np.uint8), np.ones((5, 4, 3), np.uint8)
  row = visualize.side_by_side([a, b], gap=2)
  assert row.shape == (5, 9, 3) and (row[:, 3:5] == 255).all()
  with pytest.raises(ValueError, match='differ in height'):
    visualize.side_by_side([a, np.zeros((6, 3, 3), np.uint8)])


def test_segmenter_knows_the_dataset_and_batches(segmenter):
  assert segmenter.dataset == 'voc2012'
  assert segmenter.class_names[15] == classes.CLASS_NAMES['voc2012'][15]
  images = [
    np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
    for i, size in enumerate([(30, 40, 3), (50, 21, 3), (48, 48, 3)])
  ]
  batch = segmenter.predict_batch(images)
  for image, labels in zip(images, batch, strict=True):
    assert labels.shape == image.shape[:2]
    np.testing.assert_array_equal(segmenter.predict(Image.fromarray(image)), labels)
  assert len(np.unique(np.concatenate([b.ravel() for b in batch]))) > 1


def test_predict_files_writes_palette_pngs(segmenter, tmp_path):
  src = tmp_path / 'in'
  (src / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(3)
  Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(src / 'a.png')
  Image.fromarray(rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)).save(src / 'sub' / 'b.jpg')
  files = list_images(src)
  assert [f.name for f in files] == ['a.png', 'b.jpg']
  out = tmp_path / 'out'
  predict_files(segmenter, files, out, root=src, progress=False)
  palette = classes.PALETTES['voc2012']
  for name, path in (('a', src / 'a.png'), ('sub/b', src / 'sub' / 'b.jpg')):
    image = read_image(path)
    with Image.open(out / f'{name}.png') as f:
      assert f.mode == 'L'
      labels = np.asarray(f)
    np.testing.assert_array_equal(labels, segmenter.predict(image))
    with Image.open(out / f'{name}_color.png') as f:
      color = np.asarray(f.convert('RGB'))
    np.testing.assert_array_equal(color, palette[labels])
    with Image.open(out / f'{name}_overlay.png') as f:
      over = np.asarray(f.convert('RGB'))
    h, w = labels.shape
    assert over.shape[0] >= h and over.shape[1] > w  # The legend on the right.
    np.testing.assert_array_equal(over[:h, :w], visualize.overlay(image, labels, palette))


def test_a_training_workdir_sets_dataset_and_test_geometry(tmp_path):
  """A workdir's config.json names the data set (palette, class names) and the eval setup,
  so a model trained on 129-pixel synthetic scenes is not run at ADE20K's 512."""

  model_config = dict(num_classes=11, depth=18, width=8, head_channels=16, aux_channels=8)
  variables = random_variables(PSPNet(**model_config), seed=2)
  weights.save_variables(tmp_path, variables, model_config)
  seg = Segmenter.from_checkpoint(tmp_path)
  assert seg.dataset is None and seg.inference.procedure.base_size == 512  # No run config.
  config = load_config('synthetic')
  (tmp_path / weights.RUN_CONFIG_FILE).write_text(config.to_json())
  seg = Segmenter.from_checkpoint(tmp_path, flip=False)
  assert seg.dataset == 'synthetic' and seg.class_names[7] == 'car'
  np.testing.assert_array_equal(seg.palette, classes.PALETTES['synthetic'])
  got = seg.inference.procedure
  assert (got.mode, got.base_size, got.flip) == ('whole', config.eval.base_size, False)
  (tmp_path / weights.RUN_CONFIG_FILE).write_text('{not json')
  with pytest.raises(ValueError, match='config.json is not a run config'):
    Segmenter.from_checkpoint(tmp_path)


def test_list_images_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file'):
    list_images(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='no images'):
    list_images(tmp_path)


@pytest.mark.torch
@pytest.mark.e2e
def test_command_line_on_an_official_pth_matches_torch(tmp_path):
  """python -m psp_jax.predict on a .pth (converted on the fly) against tool/test.py's
  procedure transcribed around the PyTorch model itself."""
  torch = pytest.importorskip('torch')

  from psp_jax.interop import torch_pspnet  # noqa: PLC0415 (needs torch, which is optional here)

  torch.manual_seed(0)
  net = torch_pspnet.build(
    dict(num_classes=NUM_CLASSES, depth=18, width=8, head_channels=16, aux_channels=8)
  ).eval()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    # Centre the logits on a probe so that the argmax varies over the image, and sharpen
    # them so that few pixels are near-ties.
    probe = torch.randn(2, 3, 40, 50)
    logits = net(probe)
    net.cls[4].bias -= logits.mean(dim=(0, 2, 3))
    net.cls[4].weight *= 10 / logits.std()
    net.cls[4].bias *= 10 / logits.std()
  # As the official multi-GPU checkpoints: under 'state_dict', names prefixed 'module.'.
  state = {f'module.{k}': v for k, v in net.state_dict().items()}
  torch.save({'epoch': 100, 'state_dict': state}, tmp_path / 'train_epoch_100.pth')
  src, out = tmp_path / 'in', tmp_path / 'out'
  src.mkdir()
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(40, 61, 3), (52, 30, 3)]]
  for i, image in enumerate(images):
    Image.fromarray(image).save(src / f'img{i}.png')
  result = subprocess.run(
    [sys.executable, '-m', 'psp_jax.predict', f'--checkpoint={tmp_path / "train_epoch_100.pth"}']
    + [f'--input={src}', f'--output={out}', '--crop_size=33', '--base_size=48']
    + ['--scales=0.75,1.25'],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]

  def torch_apply(variables, x):
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    with torch.no_grad():
      return net(x).permute(0, 2, 3, 1).numpy()

  palette = classes.PALETTES['voc2012']
  for i, image in enumerate(images):
    labels = np.asarray(Image.open(out / f'img{i}.png'))
    np.testing.assert_array_equal(
      np.asarray(Image.open(out / f'img{i}_color.png')), palette[labels]
    )
    ref = semseg_test_reference(
      torch_apply, None, image, (33, 33), 48, (0.75, 1.25), classes=NUM_CLASSES
    )
    top2 = np.sort(ref, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4  # Float32 near-ties may go either way.
    assert clear.mean() > 0.95 and len(np.unique(labels)) > 3
    np.testing.assert_array_equal(labels[clear], ref.argmax(-1)[clear])
