"""Tests of the sharded train step: SyncBN over devices, the compiled collectives, accumulation.

A tiny PSPNet (depth 18, width 4, crop 41) on 8 simulated CPU devices (tests/conftest.py).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from psp_jax import distributed, weights
from psp_jax.data import pipeline
from psp_jax.models import codec
from psp_jax.train import loop, losses, optim, train_state, train_step

from helpers import BATCH, CROP, NUM_CLASSES, free_port, tiny_config


def global_batch(seed: int = 0, batch: int = BATCH) -> dict[str, np.ndarray]:
  """A fixed batch: normalised-looking images and labels with some ignore pixels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, (batch, CROP, CROP)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.1] = 255
  images = rng.normal(size=(batch, CROP, CROP, 3)).astype(np.float32)
  images[..., 0] += labels.clip(0, NUM_CLASSES) * 0.3  # Something learnable.
  return {'image': images, 'label': labels}


def make_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The train step of the config, jitted for the mesh as train_lib does (not compiled yet)."""
  model = codec.build_model(codec.of_experiment(config, 'cpu'))
  tx, schedule = optim.create_optimizer(config.optim, config.num_train_steps)
  step = train_step.train_step_of_config(model, tx, schedule, config, mesh)
  shardings = jax.tree.map(lambda _: distributed.replicated(mesh), initial_abstract(config))
  return train_step.compile_train_step(step, shardings, mesh)


def initial_abstract(config: ml_collections.ConfigDict):
  """The TrainState structure of the config (jax.eval_shape: nothing is compiled)."""
  model = codec.build_model(codec.of_experiment(config, 'cpu'))
  tx, _ = optim.create_optimizer(config.optim, config.num_train_steps)
  init = train_state.init_fn(model, tx, (1, CROP, CROP, 3))
  return jax.eval_shape(init, jax.random.key(config.seed))


def place(host_state, mesh: jax.sharding.Mesh):
  """A host (numpy) TrainState replicated over the mesh: a fresh copy for each run."""
  return jax.device_put(host_state, distributed.replicated(mesh))


def run_steps(compiled, host_state, mesh, batches, rng_seed: int = 1):
  """The state after one step per batch from host_state, and each step's metrics."""
  state = place(host_state, mesh)
  key = distributed.replicated_key(mesh, rng_seed)
  history = []
  for batch in batches:
    state, metrics = compiled(state, pipeline.to_global(batch, mesh), key)
    history.append(jax.device_get(metrics))
  return state, history


def as_numpy(state) -> dict[str, np.ndarray]:
  """Flat {path: array} of params and batch_stats (fully replicated, so addressable)."""
  flat = jax.tree_util.tree_flatten_with_path(state.variables)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


@pytest.fixture(scope='module')
def initial_state():
  """A fresh TrainState of tiny_config(), initialised into its 8-device shardings, on host."""
  config = tiny_config()
  model = codec.build_model(codec.of_experiment(config, 'cpu'))
  tx, _ = optim.create_optimizer(config.optim, config.num_train_steps)
  mesh = distributed.create_mesh()
  state, shardings = train_state.create_train_state(
    model, tx, jax.random.key(0), (1, CROP, CROP, 3), mesh
  )
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
  assert jax.tree.leaves(state)[0].sharding.mesh.size == 8
  return jax.device_get(state)


@pytest.fixture(scope='module')
def eight_device_run(initial_state):
  """3 steps on 8 devices: (final params/stats, metrics per step, compiled HLO text)."""
  mesh = distributed.create_mesh()
  assert mesh.size == 8
  batches = [global_batch(i) for i in range(3)]
  example = (place(initial_state, mesh), pipeline.to_global(batches[0], mesh))
  compiled = make_step(tiny_config(), mesh).lower(*example, jax.random.key(1)).compile()
  state, history = run_steps(compiled, initial_state, mesh, batches)
  return as_numpy(state), history, compiled.as_text()


@pytest.mark.slow  # 20-45 s on 2 cores: a 1-device compile beside the fixture's.
def test_one_device_and_eight_devices_agree(initial_state, eight_device_run):
  # Same global batch on 1 and on 8 devices: BatchNorm statistics over the global batch
  # (SyncBN) and dropout masks independent of the split make the runs the same.
  got8, history8, _ = eight_device_run
  mesh1 = distributed.create_mesh(jax.devices()[:1])
  batches = [global_batch(i) for i in range(3)]
  state1, history1 = run_steps(make_step(tiny_config(), mesh1), initial_state, mesh1, batches)
  got1 = as_numpy(state1)
  assert got1.keys() == got8.keys()
  assert any('batch_stats' in k for k in got1) and any("'aux'" in k for k in got1)
  # Only the order of float32 sums differs (measured: at most 1.8e-5 absolute, in layer0,
  # after 3 steps); BatchNorm over each device's single image would differ by O(1).
  for key in got1:
    np.testing.assert_allclose(got8[key], got1[key], rtol=2e-4, atol=5e-5, err_msg=key)
  for m1, m8 in zip(history1, history8, strict=True):
    np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  # The three steps did change things (the comparison is not of two initial states).
  assert history8[0]['loss'] != history8[2]['loss']
  assert float(history8[0]['lr']) == pytest.approx(0.01)
  moved = as_numpy(place(initial_state, mesh1))
  assert any(not np.allclose(moved[k], got1[k]) for k in got1 if 'batch_stats' in k)


@pytest.mark.slow  # eight_device_run: an 8-device train-step compile, ~1 min on 2 cores.
def test_compiled_step_all_reduces_gradients_and_never_gathers_parameters(eight_device_run):
  hlo = eight_device_run[2]
  assert 'all-reduce' in hlo  # Gradients (and BatchNorm moments) summed over devices.
  # Parameters are replicated: no device ever has to fetch another's part of them.
  assert 'all-gather' not in hlo
  # The batch stays split: each device's input is its 1/8 of the global batch.
  assert f'f32[{BATCH // 8},{CROP},{CROP},3]' in hlo


@pytest.mark.slow  # 25-40 s on 2 cores: two more compiles.
def test_gradient_accumulation_averages_micro_batch_gradients(initial_state):
  # With no momentum, decay or dropout, one step of A=2 micro-batches moves the parameters
  # by the mean of the two micro-batch updates (each from the same parameters), and the
  # BatchNorm statistics see micro-batch 0 (examples 0, 2, ...) then micro-batch 1.
  base = dict(momentum=0.0, weight_decay=0.0)
  config = tiny_config(grad_accum_steps=2, **base)
  config.model.dropout_rate = 0.0
  mesh = distributed.create_mesh()
  batch = global_batch(5, batch=2 * BATCH)
  accumulated, history = run_steps(make_step(config, mesh), initial_state, mesh, [batch])

  single = tiny_config(**base)
  single.model.dropout_rate = 0.0
  single_step = make_step(single, mesh)
  micro = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
  state_a, history_a = run_steps(single_step, initial_state, mesh, [micro[0]])
  state_b, history_b = run_steps(single_step, initial_state, mesh, [micro[1]])
  got, a, b = as_numpy(accumulated), as_numpy(state_a), as_numpy(state_b)
  for key in got:
    if key.startswith("['params']"):
      np.testing.assert_allclose(got[key], (a[key] + b[key]) / 2, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    history[0]['loss'], (history_a[0]['loss'] + history_b[0]['loss']) / 2, rtol=1e-5
  )
  # Running means (fresh: 0): micro-batch 1's update applied on top of micro-batch 0's,
  # m * (1 - m) mu_0 + (1 - m) mu_1 with Flax momentum m = 0.9.
  for key in got:
    if key.startswith("['batch_stats']") and key.endswith("['mean']"):
      np.testing.assert_allclose(got[key], 0.9 * a[key] + b[key], rtol=1e-4, atol=1e-6)


def test_uint8_images_normalise_on_the_device_as_on_the_host():
  raw = np.random.default_rng(4).integers(0, 256, (2, 9, 7, 3), np.uint8)
  host = pipeline.transforms.normalize(raw).numpy()
  device = np.asarray(jax.jit(train_step.normalised_images)(raw))
  # XLA multiplies by the reciprocal of std where the host divides: at most one ulp apart.
  np.testing.assert_array_max_ulp(device, host, maxulp=1)
  floats = jnp.asarray(host)
  assert train_step.normalised_images(floats) is floats  # float32: normalised already.


@pytest.mark.slow  # Two compiles of the step (uint8 and float32 inputs), ~20 s on 2 cores.
def test_uint8_images_train_as_their_host_normalised_float32(initial_state):
  """data.transfer_dtype 'uint8': one step from the same uint8 images, normalised on the
  device or by the host (transforms.normalize, the float32 pipeline's last op), gives the
  same state to float32 rounding."""
  mesh = distributed.create_mesh(jax.devices()[:2])
  step = make_step(tiny_config(), mesh)
  batch = global_batch(6, batch=2)
  raw = np.random.default_rng(4).integers(0, 256, batch['image'].shape, np.uint8)
  host = pipeline.transforms.normalize(raw).numpy()
  state_u8, history_u8 = run_steps(step, initial_state, mesh, [{**batch, 'image': raw}])
  state_f32, history_f32 = run_steps(step, initial_state, mesh, [{**batch, 'image': host}])
  got, expected = as_numpy(state_u8), as_numpy(state_f32)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(history_u8[0]['loss'], history_f32[0]['loss'], rtol=1e-6)
  # Not a comparison of two untouched states: the step moved the parameters.
  moved = as_numpy(place(initial_state, mesh))
  assert any(not np.allclose(moved[k], got[k]) for k in got if 'params' in k)
  # And the uint8 step is fed uint8, a quarter of float32's bytes.
  example = pipeline.to_global({**batch, 'image': raw}, mesh)
  lowered = step.lower(place(initial_state, mesh), example, jax.random.key(1))
  assert 'tensor<2x41x41x3xui8>' in lowered.as_text()


def test_loss_groups_average_per_group_means():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(4, 3, 5, NUM_CLASSES)), jnp.float32)
  labels = rng.integers(0, NUM_CLASSES, (4, 3, 5))
  labels[0, :2] = 255
  labels[3] = 255  # An example of pure ignore pixels.
  labels = jnp.asarray(labels)
  sums, counts = losses.cross_entropy_sums(logits, labels)
  np.testing.assert_array_equal(counts, [5, 15, 15, 0])
  # groups=1: one mean over every labelled pixel of the batch.
  got = losses.cross_entropy(logits, labels, 255, groups=1)
  np.testing.assert_allclose(got, sums.sum() / counts.sum(), rtol=1e-6)
  # groups=2: (mean over examples 0-1 + mean over examples 2-3) / 2.
  got = losses.cross_entropy(logits, labels, 255, groups=2)
  expected = ((sums[0] + sums[1]) / 20 + sums[2] / 15) / 2
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # groups=4: a slice without labelled pixels contributes 0 (torch would give NaN).
  got = losses.cross_entropy(logits, labels, 255, groups=4)
  np.testing.assert_allclose(got, (sums[0] / 5 + sums[1] / 15 + sums[2] / 15 + 0) / 4, rtol=1e-6)


def test_cross_entropy_is_optax_bit_for_bit_and_accuracy_is_argmax_but_for_ties():
  # losses picks the label's logit by a masked sum (one read of the logits on TPU, with
  # logsumexp's): optax's numbers; the accuracy compares that logit with the maximum.
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(3, 5, 7, NUM_CLASSES)).astype(np.float32)
  # Ties: a row of equal logits and rows whose maximum appears twice (argmax: the first).
  logits[0, 0, :3] = 1.5
  logits[1, 1, :, [1, NUM_CLASSES - 1]] = 9.0
  labels = rng.integers(0, NUM_CLASSES, (3, 5, 7))
  labels[0, 0, 0], labels[0, 0, 1] = 0, 1
  labels[1, 1, :3], labels[2, 0] = 1, 255
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  valid = labels != 255
  safe = jnp.where(valid, labels, 0)

  def ours(x):
    return losses.cross_entropy_sums(x, labels)[0].sum()

  def theirs(x):
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(x, safe)
    return jnp.where(valid, per_pixel, 0.0).sum((1, 2)).sum()

  sums, _ = losses.cross_entropy_sums(logits, labels)
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  np.testing.assert_array_equal(sums, jnp.where(valid, per_pixel, 0.0).sum((1, 2)))
  np.testing.assert_array_equal(jax.grad(ours)(logits), jax.grad(theirs)(logits))
  # Accuracy: argmax's, except that a label tied with the maximum counts as right.
  correct = (jnp.argmax(logits, -1) == labels) & valid
  assert bool(correct[1, 1, :3].all()) and not bool(correct[0, 0, 1])
  tied = jnp.zeros_like(valid).at[0, 0, :3].set(True)  # Every class ties there.
  expected = (correct | tied).sum() / valid.sum()
  assert 0 < expected < 1
  assert float(losses.pixel_accuracy(logits, labels)) == float(expected)


def numpy_mmseg_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """mmseg's CrossEntropyLoss (avg_non_ignore=False) restated: F.cross_entropy with
  reduction='none' and ignore_index=255 (0 at ignored pixels), then sum / label.numel()."""
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  valid = labels != 255
  picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return float(np.where(valid, -picked, 0.0).sum() / labels.size)


def test_loss_normalization_all_is_mmseg_mean_over_every_pixel():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(4, 6, 7, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (4, 6, 7))
  labels[rng.random(labels.shape) < 0.3] = 255
  labels[3] = 255  # An example of pure ignore (or padding) pixels.
  expected = numpy_mmseg_cross_entropy(logits.astype(np.float64), labels)
  args = (jnp.asarray(logits), jnp.asarray(labels), 255)
  for groups in (1, 2, 4):  # Equal slices: the mean of their means is the batch's mean.
    got = losses.cross_entropy(*args, groups=groups, normalization='all')
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  labelled = losses.cross_entropy(*args)
  fraction = (labels != 255).mean()
  assert 0.4 < fraction < 0.6
  np.testing.assert_allclose(float(labelled) * fraction, expected, rtol=1e-6)
  # The default is the expression it always was, bit for bit.
  sums, counts = losses.cross_entropy_sums(*args)
  for groups in (1, 2):
    old = jnp.mean(
      sums.reshape(groups, -1).sum(1) / jnp.maximum(counts.reshape(groups, -1).sum(1), 1.0)
    )
    np.testing.assert_array_equal(np.asarray(losses.cross_entropy(*args, groups=groups)), old)
  with pytest.raises(ValueError, match='normalization'):
    losses.cross_entropy(*args, normalization='valid')


@pytest.mark.slow  # eight_device_run: an 8-device train-step compile, ~1 min on 2 cores.
def test_train_step_uses_the_configured_loss_normalization(initial_state, eight_device_run):
  # The same first step on the same batch with 'all' (mmseg): both heads' losses are the
  # 'labelled' ones times the labelled fraction of the batch, and loss = main + 0.4 aux.
  mesh1 = distributed.create_mesh(jax.devices()[:1])
  config = tiny_config(loss_normalization='all')
  batch = global_batch(0)
  _, history = run_steps(make_step(config, mesh1), initial_state, mesh1, [batch])
  labelled, mmseg = eight_device_run[1][0], history[0]
  fraction = float((batch['label'] != 255).mean())
  assert 0.8 < fraction < 0.95
  for key in ('main_loss', 'aux_loss'):
    np.testing.assert_allclose(mmseg[key], labelled[key] * fraction, rtol=1e-5)
  np.testing.assert_allclose(mmseg['loss'], mmseg['main_loss'] + 0.4 * mmseg['aux_loss'], rtol=1e-6)


@pytest.mark.torch
def test_cross_entropy_matches_torch_ignore_index():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 7, 9, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (2, 7, 9))
  labels[rng.random(labels.shape) < 0.3] = 255

  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 255)
  criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
  expected = criterion(torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels))
  np.testing.assert_allclose(float(got), expected.item(), rtol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.e2e
def test_two_processes_of_four_devices_match_one_of_eight(
  initial_state, eight_device_run, tmp_path
):
  # The workers start from the same initial state (saved here: spares them its compilation).
  np.savez(tmp_path / 'initial.npz', *jax.tree.leaves(initial_state))
  port, script = free_port(), str(pathlib.Path(__file__).resolve())
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = [
    subprocess.Popen(
      [sys.executable, script, 'worker', str(i), str(port), str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  got8 = eight_device_run[0]
  for i in range(2):
    for space in SPACES:  # 2 x 4 as (8 x 1) and as (4 x 2), images split over 'space'.
      got = dict(np.load(tmp_path / f'out{i}_{space}.npz'))
      assert got.keys() == got8.keys()
      for key in got:
        np.testing.assert_allclose(got[key], got8[key], rtol=2e-4, atol=5e-5, err_msg=key)


SPACES = (1, 2)


def _worker(process_id: int, port: int, directory: str) -> None:
  """One of two processes with 4 CPU devices each, on the 8-device global mesh."""
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  saved = np.load(pathlib.Path(directory) / 'initial.npz')
  leaves = [saved[f'arr_{i}'] for i in range(len(saved.files))]
  host_state = jax.tree.unflatten(jax.tree.structure(initial_abstract(tiny_config())), leaves)
  for space in SPACES:
    mesh = distributed.create_mesh(space=space)
    part, parts = distributed.batch_part(mesh)
    assert (part, parts) == (process_id, 2)
    rows = slice(process_id * 4, process_id * 4 + 4)  # This process's devices' rows.
    batches = [{k: v[rows] for k, v in global_batch(i).items()} for i in range(3)]
    config = tiny_config()
    config.spatial_partitions = space
    state, _ = run_steps(make_step(config, mesh), host_state, mesh, batches)
    np.savez(pathlib.Path(directory) / f'out{process_id}_{space}.npz', **as_numpy(state))
  jax.distributed.shutdown()


if __name__ == '__main__' and sys.argv[1:2] == ['worker']:
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


@pytest.mark.slow  # initial_state: a train-state init compile, ~35 s on 2 cores.
def test_init_checkpoint_copies_the_weights_that_fit(initial_state, tmp_path):
  host = {'params': initial_state.params, 'batch_stats': initial_state.batch_stats}
  saved = jax.tree.map(lambda x: np.asarray(x) + 1.0, host)
  # A classifier of another data set (7 classes) does not fit and stays fresh.
  cls = saved['params']['cls']['conv2']
  cls['kernel'], cls['bias'] = np.ones((*cls['kernel'].shape[:3], 7)), np.ones(7)
  weights.save_variables(tmp_path / 'weights', saved, {'num_classes': 7})
  mesh = distributed.create_mesh()
  state = loop.load_init_checkpoint(place(initial_state, mesh), str(tmp_path / 'weights'))
  got, fresh = as_numpy(state), as_numpy(place(initial_state, mesh))
  for key in got:
    if "['cls']['conv2']" in key:
      np.testing.assert_array_equal(got[key], fresh[key], err_msg=key)
    else:
      np.testing.assert_allclose(got[key], fresh[key] + 1.0, rtol=1e-6, err_msg=key)
  assert jax.tree.leaves(state.params)[0].sharding.is_fully_replicated
  assert int(state.step) == 0
