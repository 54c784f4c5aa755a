"""A stand-in for SLURM's `srun` on one machine, for tests/test_slurm.py.

  srun [--option ...] PROGRAM ARGS...

Starts SLURM_NTASKS copies of PROGRAM (the job's variables come from the caller, as sbatch
sets them for its script) and gives each the variables a real srun gives a task of a job
step on one node: SLURM_STEP_NODELIST, SLURM_STEP_NUM_TASKS, SLURM_STEP_TASKS_PER_NODE,
SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID. SIGTERM and SIGINT are passed on to every task,
as srun does; the exit status is the worst task's. srun's own options are ignored.
"""

import os
import signal
import subprocess
import sys


def main() -> None:
  args = sys.argv[1:]
  while args and args[0].startswith('-'):
    args = args[1:]
  tasks = int(os.environ.get('SLURM_NTASKS', '1'))
  node = os.environ.get('SLURM_JOB_NODELIST', 'localhost')
  step = {
    'SLURM_STEP_ID': '0',
    'SLURM_STEP_NODELIST': node,
    'SLURM_STEP_NUM_NODES': '1',
    'SLURM_STEP_NUM_TASKS': str(tasks),
    'SLURM_STEP_TASKS_PER_NODE': str(tasks),
    'SLURM_NODEID': '0',
    'SLURMD_NODENAME': node,
  }
  procs = [
    subprocess.Popen(
      args, env=os.environ | step | {'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i)}
    )
    for i in range(tasks)
  ]

  def forward(signum, frame):
    for proc in procs:
      proc.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  sys.exit(max(proc.wait() for proc in procs))


if __name__ == '__main__':
  main()
