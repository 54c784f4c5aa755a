"""Spatial partitioning: each image's height split over the mesh's 'space' axis.

The train step on 8 simulated CPU devices as 4 x 2 and 2 x 4 ('data' x 'space') against
8 x 1: the same loss, metrics and new state (parameters, BatchNorm statistics, momentum)
within 1e-12 in float64 and float32's reduction-order floor, at an official 8k + 1 crop
(65: 33 rows after the stem, an odd number on every split, which XLA pads and masks out).
The compiled step must exchange halos (collective-permutes), or the split did not happen.
"""

import functools
import re

import jax
import numpy as np
import pytest

from psp_jax import distributed
from psp_jax.models import codec
from psp_jax.train import config_checks, optim, train_state, train_step

from helpers import NUM_CLASSES, tiny_config

CROP, BATCH = 65, 8
_PERMUTE = re.compile(r'\bcollective-permute(-start)?\(')


def batch_of(dtype, seed=0, crop=CROP):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, (BATCH, crop, crop)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.1] = 255
  images = rng.normal(size=(BATCH, crop, crop, 3))
  images[..., 0] += labels.clip(0, NUM_CLASSES) * 0.3
  return {'image': images.astype(dtype), 'label': labels}


def steps(
  dtype: str, space: int, grad_accum_steps=1, num_steps=2, devices=8, crop=CROP, adjust=None
):
  """(new state as numpy, metrics of each step, compiled HLO text) of num_steps steps on the
  first `devices` devices; adjust(config) changes the tiny config (a full-size model)."""
  config = tiny_config(grad_accum_steps=grad_accum_steps)
  config.data.crop_size, config.batch_size, config.spatial_partitions = crop, BATCH, space
  if adjust:
    adjust(config)
  config_checks.validate(config, device_count=devices, process_count=1)
  model_config = codec.of_experiment(config, 'cpu')
  model_config['dtype'] = model_config['param_dtype'] = dtype
  model = codec.build_model(model_config, 'cpu')
  tx, schedule = optim.create_optimizer(config.optim, config.num_train_steps)
  mesh = distributed.create_mesh(jax.devices()[:devices], space=space)
  state, shardings = train_state.create_train_state(
    model, tx, jax.random.key(0), (1, crop, crop, 3), mesh
  )
  step_fn = train_step.train_step_of_config(model, tx, schedule, config, mesh)
  jitted = train_step.compile_train_step(step_fn, shardings, mesh)
  key = distributed.replicated_key(mesh, 1)
  batches = [
    jax.device_put(batch_of(dtype, i, crop), distributed.batch_sharded(mesh))
    for i in range(num_steps)
  ]
  hlo = jitted.lower(state, batches[0], key).compile().as_text()
  history = []
  for batch in batches:
    state, metrics = jitted(state, batch, key)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}, history, hlo


def assert_same(got, expected, atol_of_scale):
  (state, history, _), (state0, history0, _) = got, expected
  assert state.keys() == state0.keys()
  for key in state0:
    scale = max(float(np.abs(state0[key]).max()), 1e-30)
    np.testing.assert_allclose(
      state[key], state0[key], rtol=0, atol=atol_of_scale * scale, err_msg=key
    )
  for metrics, metrics0 in zip(history, history0, strict=True):
    for key in ('loss', 'main_loss', 'aux_loss', 'accuracy', 'grad_norm'):
      np.testing.assert_allclose(metrics[key], metrics0[key], rtol=atol_of_scale, err_msg=key)


@functools.cache
def float64_run(space: int):
  with jax.enable_x64(True):
    return steps('float64', space)


@pytest.mark.parametrize(
  'mesh', [(4, 2), pytest.param((2, 4), marks=pytest.mark.slow)], ids=['4x2', '2x4']
)
def test_float64_step_is_the_data_parallel_step(mesh):
  got, expected = float64_run(mesh[1]), float64_run(1)
  assert_same(got, expected, 1e-12)
  # The images really are split: halos cross devices, which 8 x 1 never does.
  assert len(_PERMUTE.findall(got[2])) > 0
  assert not _PERMUTE.findall(expected[2])


@pytest.mark.slow  # Two float32 compiles with accumulation, ~40 s.
def test_float32_step_with_accumulation_is_the_data_parallel_step():
  # Micro-batches of 4 split over 'data' as on 4 devices, and each image over 'space'.
  got = steps('float32', 2, grad_accum_steps=2)
  expected = steps('float32', 1, grad_accum_steps=2, devices=4)
  assert_same(got, expected, 1e-4)  # test_train's 8 vs 1 device bound: float32's floor.
  assert len(_PERMUTE.findall(got[2])) > 0


def test_spatial_partitions_must_fit_the_devices():
  config = tiny_config()
  config.batch_size, config.spatial_partitions = 4, 2
  config_checks.validate(config, device_count=8, process_count=1)  # 4 x 2: fits.
  config.spatial_partitions = 3
  with pytest.raises(config_checks.ConfigError, match='spatial_partitions.*dividing the 8'):
    config_checks.validate(config, device_count=8, process_count=1)
  config.spatial_partitions = 1
  with pytest.raises(config_checks.ConfigError, match='config.spatial_partitions'):
    config_checks.validate(config, device_count=8, process_count=1)  # 4 images, 8 devices
  config.spatial_partitions = 4
  with pytest.raises(config_checks.ConfigError, match='be a multiple of, the 3 devices'):
    config_checks.validate(config, device_count=12, process_count=4)


def test_batch_part_follows_the_data_rows():
  assert distributed.batch_part(distributed.create_mesh(space=2)) == (0, 1)
  mesh = distributed.create_mesh(space=4)
  assert mesh.shape == {'data': 2, 'space': 4}
  assert mesh.devices[0].tolist() == jax.devices()[:4]


@pytest.mark.slow  # PSPNet-50 at full width, float64: two compiles and steps, ~2 minutes.
def test_full_size_pspnet50_step_is_the_data_parallel_step():
  # float64: at full width float32's rounding flips near-ties of the stem's max-pool, whose
  # gradient then goes to another pixel (layer0's BatchNorm bias gradients differed by 0.3%).
  def full(config):
    config.model.update(depth=50, width=64, head_channels=512, aux_channels=256)

  with jax.enable_x64(True):
    got = steps('float64', 2, num_steps=1, crop=49, adjust=full)
    expected = steps('float64', 1, num_steps=1, crop=49, adjust=full)
  assert_same(got, expected, 1e-10)
  assert len(_PERMUTE.findall(got[2])) > 0
