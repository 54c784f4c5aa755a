"""One set-up for train.py's step and the pre-flight's: psp_jax.train.training.build.

A tiny PSPNet on 8 simulated CPU devices; nothing here compiles a step (lowering only).
"""

import jax
import pytest

from psp_jax import distributed
from psp_jax.data import pipeline
from psp_jax.train import aot, tpu_chips, training

from helpers import BATCH, CROP, PIPELINE_CROP, data_config, source, tiny_config


@pytest.fixture(scope='module')
def mesh():
  return distributed.create_mesh()


def spec(x):
  return x.shape, x.dtype, x.sharding


@pytest.mark.parametrize('transfer_dtype', ['float32', 'uint8'])
def test_batch_is_what_the_pipeline_delivers_split_on_data(mesh, transfer_dtype):
  config = tiny_config()
  config.data = data_config(transfer_dtype=transfer_dtype)
  built = training.build(config, mesh, 'cpu', 6)
  dataset = pipeline.build_train_dataset(source(), config.data, batch_size=BATCH, seed=0)
  batch = next(iter(pipeline.numpy_batches(dataset)))
  assert set(built.batch) == set(batch)
  size = (BATCH, PIPELINE_CROP, PIPELINE_CROP)
  assert batch['image'].shape == (*size, 3) and batch['label'].shape == size
  for name, array in batch.items():
    assert built.batch[name].shape == array.shape
    assert built.batch[name].dtype == array.dtype
    placed = pipeline.to_global(batch, mesh)[name]
    assert spec(built.batch[name]) == spec(placed)
  assert batch['image'].dtype == transfer_dtype


def test_key_and_state_are_what_the_loop_passes(mesh):
  config = tiny_config()
  built = training.build(config, mesh, 'cpu', 6)
  assert spec(built.key) == spec(training.dropout_key(mesh, config.seed))
  assert built.image_shape == (1, CROP, CROP, 3)
  for leaf in jax.tree.leaves(built.state):
    assert leaf.sharding == distributed.replicated(mesh)
  assert jax.tree.structure(built.shardings) == jax.tree.structure(built.state)


def test_preflight_lowers_the_program_the_loop_builds(mesh):
  """aot.train_program is training.build for 'tpu': the same lowered program, same inputs."""
  config = tiny_config()
  config.model.dtype = 'auto'  # 'tpu' makes it bfloat16, as the pre-flight reports.
  topology = aot.Topology('test', tpu_chips.CHIPS['v5e'], mesh, hosts=1)
  program = aot.train_program(config, topology)
  built = training.build(config, mesh, 'tpu', aot.total_steps(config))
  assert built.model_config['dtype'] == 'bfloat16'
  assert 'bfloat16' in program.what
  assert jax.tree.map(spec, program.args) == jax.tree.map(
    spec, (built.state, built.batch, built.key)
  )
  ours = program.jitted.lower(*program.args).as_text()
  assert ours == built.step.lower(built.state, built.batch, built.key).as_text()
