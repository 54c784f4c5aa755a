"""Checkpoint digests: bytes changed on disk after a save (bit rot) are never used in silence.

Orbax and tensorstore restore flipped array bytes as other numbers; every checkpoint kind
records a sha256 per array and every read checks it (psp_jax/digests.py). The premise is
tested too: without the check, the flipped checkpoint here restores without an error.
"""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from psp_jax import digests, distributed, weights
from psp_jax.train import checkpointing
from psp_jax.train.train_state import TrainState

from faults import damage  # noqa: I001 (tests/ is on sys.path)
from helpers import assert_same_tree, checkpointed_workdir, warnings_of

MODEL_CONFIG = {'num_classes': 3, 'depth': 18}


def random_state(step: int) -> TrainState:
  """A TrainState whose kernel (64 KiB of random bits) zstd cannot compress: stored as is."""
  bits = np.random.default_rng(step).integers(0, 2**32, (128, 128), dtype=np.uint32)
  return TrainState(
    step=jnp.int32(step),
    params={'conv': {'kernel': jnp.asarray(bits.view(np.float32)), 'bias': jnp.ones(8) * step}},
    batch_stats={'bn': {'mean': jnp.full((8,), -float(step))}},
    opt_state=(optax.EmptyState(), {'momentum': {'conv': {'bias': jnp.full((8,), step / 2)}}}),
  )


def abstract(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture
def workdir(tmp_path):
  """checkpoints/1, checkpoints/2 and best/2 of random_state."""
  return checkpointed_workdir(tmp_path, random_state, MODEL_CONFIG)


def test_a_digest_covers_dtype_shape_and_every_bit():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  one_bit = x.copy()
  one_bit.view(np.uint32)[2, 3] ^= 1
  assert digests.of_array(x) == digests.of_array(x.copy()) == digests.of_array(jnp.asarray(x))
  others = [one_bit, x.reshape(4, 3), x.view(np.int32), x.T.copy(), x.astype(jnp.bfloat16)]
  assert len({digests.of_array(x), *map(digests.of_array, others)}) == 1 + len(others)
  # A replicated array of 8 devices is digested from one copy, as numpy is.
  mesh = distributed.create_mesh()
  replicated = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
  assert digests.of_array(replicated) == digests.of_array(x)
  assert digests.of_array(np.float32(1.5)) == digests.of_array(jnp.float32(1.5))


def test_a_train_state_and_a_readers_dict_name_their_arrays_alike():
  state = random_state(1)
  names = digests.of_tree(state)['arrays']
  assert sorted(names) == [
    'batch_stats/bn/mean',
    'opt_state/1/momentum/conv/bias',
    'params/conv/bias',
    'params/conv/kernel',
    'step',
  ]
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  assert digests.mismatches(variables, digests.of_tree(state)) == []
  changed = dict(variables, batch_stats={'bn': {'mean': jnp.zeros(8)}})
  assert digests.mismatches(changed, digests.of_tree(state)) == ['batch_stats/bn/mean']
  assert digests.mismatches(variables, {'algorithm': 'md5', 'arrays': {}}) != []


def test_flipped_bytes_restore_silently_without_digests_and_training_falls_back(workdir, caplog):
  flipped = damage(workdir / 'checkpoints' / '2' / 'state', 'flipped')
  assert flipped.parent.name == 'd'  # An array data file, not the manifest.
  ckpts = checkpointing.Checkpoints(str(workdir), keep=3, async_save=False)
  # The premise: orbax alone restores other numbers, with no error.
  target = abstract(random_state(2))
  plain = ckpts.latest.restore(
    2, args=checkpointing.ocp.args.Composite(state=checkpointing.ocp.args.StandardRestore(target))
  )['state']
  kernel = np.asarray(plain.params['conv']['kernel'])
  assert not np.array_equal(
    kernel.view(np.uint32), np.asarray(random_state(2).params['conv']['kernel']).view(np.uint32)
  )
  with pytest.raises(
    weights.DamagedCheckpointError, match='params/conv/kernel differ from the digest'
  ):
    ckpts.restore(target, 2)
  with caplog.at_level(logging.WARNING):
    state = ckpts.restore_newest(target)
  assert_same_tree(state, random_state(1))
  (warning,) = warnings_of(caplog)
  assert warning.startswith('Checkpoint step 2 cannot be read (DamagedCheckpointError: ')
  assert 'params/conv/kernel differ from the digest saved with it' in warning
  assert (workdir / 'checkpoints' / '2.damaged').is_dir()
  ckpts.close()


def test_readers_refuse_a_flipped_step_or_fall_back_from_it_in_a_workdir(workdir, caplog):
  damage(workdir / 'best' / '2' / 'state', 'flipped')
  with pytest.raises(weights.DamagedCheckpointError) as refused:
    weights.load_variables(workdir / 'best' / '2')
  assert str(refused.value).startswith(
    f'{workdir}/best/2 is damaged: params/conv/kernel differ from the digest saved with it'
  )
  with caplog.at_level(logging.WARNING):
    variables, config = weights.load_variables(workdir)
  assert config == MODEL_CONFIG
  assert_same_tree(variables['params'], random_state(2).params)  # checkpoints/2, intact.
  (warning,) = warnings_of(caplog)
  assert warning.startswith(f'Damaged checkpoint(s) in {workdir} skipped: best/2 (')
  assert warning.endswith('; using checkpoints/2 instead.')


def test_a_flipped_weights_directory_is_refused_naming_the_array(tmp_path):
  state = random_state(3)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  weights.save_variables(tmp_path / 'w', variables, MODEL_CONFIG)
  assert (
    digests.mismatches(
      weights.load_variables(tmp_path / 'w')[0], weights.saved_digests(tmp_path / 'w')
    )
    == []
  )
  damage(tmp_path / 'w' / weights.VARIABLES_DIR, 'flipped')
  with pytest.raises(weights.DamagedCheckpointError, match=r'/w is damaged: params/conv/kernel'):
    weights.load_variables(tmp_path / 'w')
  (tmp_path / 'w' / digests.FILE).write_text('{"algorithm": "sha2')
  with pytest.raises(weights.DamagedCheckpointError, match=r'digests.json cannot be read'):
    weights.load_variables(tmp_path / 'w')


def test_checkpoints_written_before_digests_load_with_one_warning(workdir, tmp_path, caplog):
  for step_dir in (workdir / 'checkpoints' / '2', workdir / 'best' / '2'):
    shutil.rmtree(step_dir / digests.ITEM)
  state = random_state(3)
  weights.save_variables(
    tmp_path / 'w', {'params': state.params, 'batch_stats': state.batch_stats}, MODEL_CONFIG
  )
  (tmp_path / 'w' / digests.FILE).unlink()
  with caplog.at_level(logging.WARNING):
    ckpts = checkpointing.Checkpoints(str(workdir), keep=3, async_save=False)
    assert_same_tree(ckpts.restore_newest(abstract(random_state(2))), random_state(2))
    ckpts.close()
    assert_same_tree(
      weights.load_variables(workdir / 'best' / '2')[0]['params'], random_state(2).params
    )
    assert_same_tree(weights.load_variables(tmp_path / 'w')[0]['params'], state.params)
  assert warnings_of(caplog) == [
    f'{path} has no digests (it was written before psp-jax recorded them): its arrays are used '
    'unchecked.'
    for path in (workdir / 'checkpoints' / '2', workdir / 'best' / '2', tmp_path / 'w')
  ]
