"""A disk that fills during training: one message, the newest complete checkpoint intact,
and a rerun (once there is room) resumes to the uninterrupted run's weights.

The small disk is a tmpfs, mounted where the machine allows it (root, or CAP_SYS_ADMIN);
elsewhere the test is skipped, saying why. tests/faults.py fills it between two saves.
"""

import shutil
import subprocess

import pytest

from helpers import assert_same_state, check, refused, steps, train, user_env

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group('train_py')]  # test_train_run's worker


@pytest.fixture
def small_disk(tmp_path):
  """A 24 MiB tmpfs, unmounted afterwards."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  command = shutil.which('mount')
  made = command and subprocess.run(
    [command, '-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', str(mount)],
    capture_output=True,
    text=True,
  )
  if not made or made.returncode:
    why = made.stderr.strip() if made else 'no mount command'
    pytest.skip(f'a small disk needs a tmpfs, which cannot be mounted here: {why}')
  yield mount
  subprocess.run(['umount', str(mount)], check=True)


def test_a_full_disk_stops_with_one_message_and_the_rerun_resumes_exactly(tmp_path, small_disk):
  shared = dict(data_dir=str(tmp_path / 'tfds'), cache=str(tmp_path / 'xla_cache'))
  straight = tmp_path / 'straight'
  check(train(shared, straight, num_train_steps=9))
  workdir, filler = small_disk / 'run', small_disk / 'filler'
  faults = user_env(FAULT_FILL_DISK_AT_STEP='6', FAULT_FILLER=str(filler))
  proc = train(shared, workdir, script='faults.py', env=faults, num_train_steps=9)
  message = refused(proc, 1, f'The disk of --workdir {workdir} is full', 'MiB free now')
  assert 'the run needs' in message and 'of checkpoints' in message
  assert 'The newest complete checkpoint, step 3, is intact' in message
  assert 'rerun the same command to resume from it' in message
  assert '3' in steps(workdir) and '6' not in steps(workdir)

  filler.unlink()
  log = check(train(shared, workdir, num_train_steps=9))
  assert f'Resumed from {workdir} at step 3.' in log
  assert_same_state(workdir / 'checkpoints' / '9', straight / 'checkpoints' / '9')
