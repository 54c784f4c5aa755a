"""train.py as two processes on one machine whose start-ups take very different times.

On the CPU the processes exchange through Gloo, and the first collective over a set of
devices connects them with a 30 s deadline (jaxlib 0.10): a process that came to the first
step later than that failed the run with 'Gloo context initialization failed' (seen in the
suite: one process initialised the model in 2 s, the other in 59 s). The processes now meet
at a barrier of jax's coordination service (distributed.meet) once the step is compiled.
"""

import subprocess
import time

import pytest

from psp_jax import distributed

from helpers import command, free_port, user_env

# Mostly a sleep: beside the train_py group, not in it.
pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

LATE_S = 40  # Past Gloo's 30 s, with room for the other process's own compile.


def test_a_process_that_reaches_the_first_step_late_still_trains_with_the_other(tmp_path):
  shared = dict(data_dir=str(tmp_path / 'tfds'), cache='')
  workdir = tmp_path / 'run'
  port = free_port()
  flags = f'{distributed.CPU_XLA_FLAGS} --xla_force_host_platform_device_count=4'
  env = user_env(FAULT_LATE_PROCESS=f'1:{LATE_S}') | {'XLA_FLAGS': flags}
  run = dict(batch_size=8, num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  started = time.monotonic()
  procs = []
  for index in range(2):
    args = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={index}']
    cmd = command(shared, workdir, *args, script='faults.py', **run)
    log = open(tmp_path / f'{index}.log', 'w')  # noqa: SIM115 (closed below)
    procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  for index, (proc, log) in enumerate(procs):
    code = proc.wait(timeout=900)
    log.close()
    assert code == 0, (tmp_path / f'{index}.log').read_text()[-4000:]
  assert time.monotonic() - started > LATE_S  # The fault was there.
  assert 'on 8 devices (2 processes, cpu)' in (tmp_path / '0.log').read_text()
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2']  # Saved together.
