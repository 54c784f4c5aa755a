"""train.py under SLURM: tools/slurm/train.sbatch, run as sbatch would run it, on one machine.

The script runs with the variables sbatch gives a batch script, and `srun` is
tests/fake_srun.py: two tasks of four CPU devices, each with the variables a real srun gives
a task. Nothing else tells the tasks of each other: psp_jax.distributed sees SLURM's
variables and jax.distributed finds the coordinator (the step's first node, a port from the
job id). The run trains as train.py does in one process of eight devices (the same global
batches; the state within float32's reduction order), and a preemption (SIGTERM to every
task, as SLURM sends before it stops a job) then a requeue (the same script again) ends bit
for bit as the uninterrupted run.
"""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from psp_jax import distributed

from helpers import ROOT, assert_same_state, check, command, restored, train, user_env

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess, pytest.mark.xdist_group('train_py')]
TASKS, DEVICES = 2, 4
SCRIPT = ROOT / 'tools' / 'slurm' / 'train.sbatch'
RUN = dict(batch_size=8)  # One image a device of the eight (helpers.command's run: 6 steps).
_PORTS = (65535 - 2**12 + 1, 65535)  # jax's SLURM coordinator port: job id % 4096 above.


def free_job_id() -> int:
  """A job id whose coordinator port (jax's rule) is free on this machine."""
  for port in range(*_PORTS):
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:
        continue
    return port - _PORTS[0]
  raise AssertionError('no free port in the SLURM range')


@pytest.fixture(scope='module')
def fake_bin(tmp_path_factory):
  """A folder whose `srun` is tests/fake_srun.py."""
  folder = tmp_path_factory.mktemp('bin')
  srun = folder / 'srun'
  srun.write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests" / "fake_srun.py"} "$@"\n')
  srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
  return folder


def sbatch(shared, workdir, fake_bin) -> tuple[subprocess.Popen, object]:
  """Starts the batch script as sbatch would on one node of TASKS tasks; (process, log)."""
  overrides = [a for a in command(shared, workdir, **RUN) if a.startswith('--config.')]
  flags = f'{distributed.CPU_XLA_FLAGS} --xla_force_host_platform_device_count={DEVICES}'
  env = user_env() | {
    'PATH': f'{fake_bin}{os.pathsep}{os.environ["PATH"]}',
    'SLURM_JOB_ID': str(free_job_id()),
    'SLURM_JOB_NODELIST': 'localhost',
    'SLURM_JOB_NUM_NODES': '1',
    'SLURM_NNODES': '1',
    'SLURM_NTASKS': str(TASKS),
    'SLURM_TASKS_PER_NODE': str(TASKS),
    'PSP_PYTHON': sys.executable,
    'PSP_CONFIG': str(ROOT / 'configs' / 'synthetic.py'),
    'PSP_WORKDIR': str(workdir),
    'PSP_DATA_DIR': shared['data_dir'],
    'PSP_DTYPE': 'float32',
    'JAX_COMPILATION_CACHE_DIR': shared['cache'],
    'XLA_FLAGS': flags,
  }
  log = workdir.parent / f'{workdir.name}.log'
  with open(log, 'w') as out:
    # A session of its own: SLURM signals every process of a job, as killpg does here.
    proc = subprocess.Popen(
      ['bash', str(SCRIPT), *overrides],
      env=env,
      cwd=ROOT,
      stdout=out,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
  return proc, log


def finish(job) -> str:
  proc, log = job
  code = proc.wait(timeout=900)
  text = log.read_text()
  assert code == 0, text[-4000:]
  return text


def one_process(shared, workdir) -> str:
  """The same run as one process of TASKS * DEVICES devices."""
  flags = f'{distributed.CPU_XLA_FLAGS} --xla_force_host_platform_device_count={TASKS * DEVICES}'
  proc = train(shared, workdir, env=user_env() | {'XLA_FLAGS': flags}, **RUN)
  return check(proc)


def assert_close_state(got_dir, expected_dir) -> None:
  """The same state up to float32's reduction order: each array within 1e-4 of its largest
  magnitude (the all-reduce sums in another order across processes: 1e-5 measured)."""
  keys = ('step', 'params', 'batch_stats', 'opt_state')
  got, expected = restored(got_dir, keys), restored(expected_dir, keys)
  assert got.keys() == expected.keys()
  for key in expected:
    scale = float(np.abs(expected[key]).max())
    np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-4 * scale, err_msg=key)


def test_train_sbatch_finds_its_tasks_and_resumes_exactly_after_a_requeue(tmp_path, fake_bin):
  shared = dict(data_dir=str(tmp_path / 'tfds'), cache=str(tmp_path / 'xla_cache'))
  one = tmp_path / 'one'
  assert 'on 8 devices (1 processes, cpu)' in one_process(shared, one)
  two = tmp_path / 'two'
  log = finish(sbatch(shared, two, fake_bin))
  assert 'on 8 devices (2 processes, cpu)' in log, log[-3000:]
  # SLURM's variables alone make the tasks one run, on the global batches of one process.
  # At step 3: from scratch, this tiny network's later steps amplify float32's differences
  # (a nearly constant BatchNorm channel took them from 1e-5 to 1e-2 in one step).
  assert_close_state(two / 'checkpoints' / '3', one / 'checkpoints' / '3')

  # A preemption: SIGTERM to every process of the job, then the script runs again.
  requeued = tmp_path / 'requeued'
  proc, log_path = job = sbatch(shared, requeued, fake_bin)
  deadline = time.monotonic() + 600
  while log_path.read_text().count('SIGTERM or Ctrl-C saves') < TASKS:
    assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGTERM)  # The script (exec'd srun) and every task, as SLURM does.
  log = finish(job)
  preempted = re.search(r'Preempted at step (\d+) \(SIGTERM\): checkpoint saved', log)
  assert preempted, log[-4000:]
  step = int(preempted.group(1))
  assert 1 <= step < 6
  log = finish(sbatch(shared, requeued, fake_bin))
  assert f'Resumed from {requeued} at step {step}.' in log, log[-3000:]
  assert_same_state(requeued / 'checkpoints' / '6', two / 'checkpoints' / '6')
