"""GPUs: the `cuda` extra resolves, the CPU set-up never installs it, and SLURM tasks get
the right GPUs (psp_jax.distributed). docs/gpu.md is the guide; tests/test_slurm.py runs the
SLURM script on CPU devices."""

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib

import pytest

from psp_jax import distributed

from helpers import ROOT

PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())


def cuda_requirement() -> str:
  (requirement,) = PYPROJECT['project']['optional-dependencies']['cuda']
  return requirement


def test_the_cuda_extra_is_jax_cuda_at_the_pinned_jax():
  assert re.fullmatch(r'jax\[cuda12\]==[\d.]+', cuda_requirement())
  tpu = PYPROJECT['project']['optional-dependencies']['tpu'][0]
  assert cuda_requirement().split('==')[1] == tpu.split('==')[1]  # The jax that trains.


def test_the_cpu_set_up_installs_no_cuda_wheel():
  """make setup (README's commands) on a clean clone: nothing of CUDA in this environment."""
  names = {d.metadata['Name'].lower() for d in importlib.metadata.distributions()}
  cuda = sorted(n for n in names if n.startswith(('nvidia-', 'jax-cuda', 'jax_cuda')))
  assert not cuda, f'the CPU environment holds CUDA wheels: {cuda}'


@pytest.mark.e2e
@pytest.mark.network
def test_the_cuda_extra_resolves_against_the_registry(tmp_path):
  """pip resolves jax[cuda12] at our pin to its plugin of the same version (nothing installed)."""
  report = tmp_path / 'report.json'
  args = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--ignore-installed']
  args += ['--quiet', '--report', str(report), cuda_requirement()]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
  if proc.returncode and re.search(
    r'connection|resolve host|unreachable|timed out', proc.stderr, re.I
  ):
    pytest.skip(f'the package registry cannot be reached: {proc.stderr.strip()[-300:]}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = {
    i['metadata']['name']: i['metadata']['version']
    for i in json.loads(report.read_text())['install']
  }
  version = cuda_requirement().split('==')[1]
  assert found['jax'] == version and found['jax-cuda12-plugin'] == version, found
  assert any(name.startswith('nvidia-cudnn') for name in found), found


SRUN = {
  'SLURM_JOB_ID': '4242',
  'SLURM_STEP_NODELIST': 'gpu[01-02]',
  'SLURM_PROCID': '9',
  'SLURM_NODEID': '1',
}


def test_slurm_tasks_need_every_variable_jax_reads():
  assert distributed.slurm_tasks({}) == 0
  env = SRUN | {'SLURM_NTASKS': '16', 'SLURM_LOCALID': '1'}
  assert distributed.slurm_tasks(env) == 16
  assert distributed.slurm_tasks({k: v for k, v in env.items() if k != 'SLURM_LOCALID'}) == 0


def test_a_task_a_gpu_keeps_jaxs_choice_and_a_task_a_node_takes_every_gpu():
  per_gpu = SRUN | {
    'SLURM_NTASKS': '16',
    'SLURM_LOCALID': '1',
    'SLURM_STEP_TASKS_PER_NODE': '8(x2)',
  }
  assert distributed.slurm_devices(per_gpu | {'SLURM_GPUS_ON_NODE': '8'}) is None
  per_node = SRUN | {
    'SLURM_NTASKS': '2',
    'SLURM_LOCALID': '0',
    'SLURM_STEP_TASKS_PER_NODE': '1(x2)',
  }
  assert distributed.slurm_devices(per_node | {'SLURM_GPUS_ON_NODE': '8'}) == list(range(8))
  assert distributed.slurm_devices(per_node | {'CUDA_VISIBLE_DEVICES': '4,5,6,7'}) == [0, 1, 2, 3]
  assert distributed.slurm_devices(per_node) is None  # Unknown: jax's choice.
  uneven = per_node | {'SLURM_STEP_TASKS_PER_NODE': '8,1', 'SLURM_GPUS_ON_NODE': '4'}
  assert distributed.slurm_devices(uneven) == [0, 1, 2, 3]  # Node 1 runs one task.
