"""In-process training runs (train.py's experiment.train_and_evaluate) that stop at a corrupt
file: each one ends, naming it, and none hangs.

A tf.data iterator stopped by a bad file used to deadlock when it was destroyed while a
parallel Python decode call waited for the GIL. The list/folder sources now read with
TensorFlow ops alone; this repeats the failing run in one process, where that hang showed.
"""

import faulthandler
import sys
import time

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from psp_jax import experiment
from psp_jax.data import files

import datagen
from helpers import tiny_config

RUNS = 20
HANG_S = 120  # One run takes seconds; one this long is stuck.
_CACHE_OPTIONS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')


@pytest.fixture
def compile_once(tmp_path):
  """JAX's persistent compilation cache in tmp_path, for this test only: each run builds a new
  model, and its initialisation would otherwise compile anew (half a minute each)."""
  saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.mark.slow  # About 90 s on 2 cores: one compile, then 20 runs of a few seconds.
@pytest.mark.e2e
def test_bad_file_stops_every_in_process_run_by_name(tmp_path, compile_once):
  expected = datagen.write_folder(tmp_path / 'data', 'train', 8, num_classes=5)
  datagen.write_folder(tmp_path / 'data', 'validation', 2, num_classes=5, seed=1)
  bad = sorted(path for path, _ in expected['train'].values())[3]
  bad.write_bytes(bad.read_bytes()[:300])  # Truncated, as an interrupted copy leaves it.
  config = tiny_config()
  config.data.update(name='folder', root=str(tmp_path / 'data'), num_classes=5)
  config.data.shuffle_buffer = 8
  # One batch holds all 8 examples: the first read meets the bad file.
  config.update(num_train_steps=2, log_every_steps=1, eval_every_steps=100)
  config.checkpoint_every_steps = 100
  for run in range(RUNS):
    # A hung run cannot be interrupted from Python: dump every thread's stack and exit.
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.stderr)
    started = time.monotonic()
    try:
      with pytest.raises(files.BadExampleError) as error:
        experiment.train_and_evaluate(config, str(tmp_path / f'run_{run}'))
    finally:
      faulthandler.cancel_dump_traceback_later()
    message = str(error.value)
    assert message.startswith(f'{bad}: cannot read the image (corrupt or truncated JPEG'), run
    assert 'skip_bad_examples' in message and time.monotonic() - started < HANG_S
