"""psp_jax.preflight: a tiny PSPNet compiled for a v5e:2x2 slice with libtpu, on a CPU.

The command runs as a subprocess with .venv-tpu's python (jax[tpu]; `make preflight-setup`),
with no TPU environment variables: a config that fits (exit 0, a sane report) and one far
too large for a chip's 16 GiB (exit 1, one message). The HLO and message parsing run here.
"""

import datetime
import json
import os
import pathlib
import subprocess

import ml_collections
import pytest

from psp_jax import preflight as preflight_cli
from psp_jax.train import aot, hbm, tpu_chips

from helpers import ROOT, parameters_index, read_notebook

# A tiny PSPNet (tests/test_train.py's sizes): a compile that fits still takes 2-4 minutes
# (slow); one that does not fit fails in seconds.
TINY = dict(depth=18, width=4, head_channels=8, aux_channels=8, dtype='float32')
COMMON = ['--config=configs/synthetic.py', '--topology=v5e:2x2', '--config.num_train_steps=100']
COMMON += [f'--config.model.{k}={v}' for k, v in TINY.items()]


def preflight(python: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  """Runs the command as a user would, with no TPU (or JAX platform) variables set."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'JAX_', 'XLA_'))}
  return subprocess.run(
    [str(python), '-m', 'psp_jax.preflight', *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=1200,
  )


@pytest.mark.slow
@pytest.mark.e2e
def test_a_config_that_fits(tpu_python, tmp_path):
  out = tmp_path / 'report.json'
  args = ['--config.data.crop_size=65', '--config.batch_size=8', '--config.eval.base_size=65']
  args += ['--config.eval.batch_size=4', '--breakdown', f'--json={out}']
  proc = preflight(tpu_python, *COMMON, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for line in ('total live', 'TFLOP', 'collectives per step and chip: all-reduce', 'roofline'):
    assert line in proc.stdout
  assert 'by model part' in proc.stdout and "XLA's cost model:" in proc.stdout
  assert 'fits: yes' in proc.stdout and '4 x TPU v5e, 1 host' in proc.stdout
  price = tpu_chips.PRICES['v5e']
  assert f'4 chips x ${price.usd_per_chip_hour:.2f} a chip-hour' in proc.stdout
  assert 'compiling train step (PSPNet-18, batch 8, crop 65x65, float32)' in proc.stderr
  report = json.loads(out.read_text())
  train = report['train']
  assert train['memory']['total'] > 0 and train['memory']['argument'] > 0
  assert train['flops'] > 0 and train['hbm_traffic'] > 0 and train['step_s'] > 0
  assert train['xla_bytes_accessed'] > train['hbm_traffic']  # XLA counts dots several times
  assert train['step_s'] == max(train['compute_s'], train['memory_s'], train['ici_s'])
  assert train['ici_traffic'] >= 4 * train['collectives']['all-reduce']['bytes']
  assert 'ICI' in proc.stdout and 'every link busy' in proc.stdout
  assert train['collectives']['all-reduce']['count'] > 0  # The gradients, and SyncBN.
  assert train['memory']['alias'] > 0  # The old state is donated.
  parts = train['breakdown']
  assert sum(p['hbm_traffic'] for p in parts.values()) == train['hbm_traffic']
  assert all(parts[f'layer{n}']['flops'] > 0 for n in range(1, 5)) and parts['PPM']['flops'] > 0
  assert parts['other']['hbm_traffic'] < 0.01 * train['hbm_traffic']  # Nearly all attributed.
  assert report['eval']['memory']['total'] > 0 and report['fits']
  usd = 4 * price.usd_per_chip_hour / 3600
  assert report['run_usd'] == pytest.approx(train['run_s'] * usd)
  assert report['run_lower_bound_usd'] == pytest.approx(train['run_lower_bound_s'] * usd)


@pytest.mark.slow
@pytest.mark.e2e
def test_tpu7x_is_four_chips_of_two_devices_and_the_bill_uses_the_price_given(tpu_python, tmp_path):
  out = tmp_path / 'report.json'
  args = [f'--json={out}', '--noeval', '--price=5', '--config.data.crop_size=65']
  proc = preflight(tpu_python, *COMMON, '--topology=tpu7x:2x2x1', *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '4 x TPU7x = 8 devices, 1 host' in proc.stdout
  assert 'per device (1/2 chip)' in proc.stdout and 'of 192.00 GiB HBM (2 devices)' in proc.stdout
  assert "1154 TFLOP/s bf16 peak, a device's 1/2 of the chip's" in proc.stdout
  report = json.loads(out.read_text())
  assert (report['chips'], report['devices']) == (4, 8)
  assert report['price']['usd_per_chip_hour'] == 5 and report['price']['source'] == '--price'
  assert report['run_usd'] == pytest.approx(report['train']['run_s'] * 4 * 5 / 3600)


@pytest.mark.slow
@pytest.mark.e2e
def test_bfloat16_gradients_are_all_reduced_in_float32(tpu_python, tmp_path):
  """On TPU the bfloat16 step's every all-reduce is float32 (psp_jax.models.mixed_conv): no
  gradient's sum over the chips is rounded to bfloat16 (autodiff's cast came after it)."""
  out = tmp_path / 'report.json'
  args = ['--config.model.dtype=bfloat16', '--config.data.crop_size=65', '--noeval']
  proc = preflight(tpu_python, *COMMON, *args, '--config.batch_size=8', f'--json={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'bfloat16' in proc.stderr
  reduce = json.loads(out.read_text())['train']['collectives']['all-reduce']
  assert reduce['count'] > 0 and set(reduce['dtypes']) <= {'f32', 's32'}, reduce
  assert reduce['dtypes']['f32'] > 0.9 * reduce['bytes']
  assert 'all-reduce' in proc.stdout and '(f32 ' in proc.stdout


@pytest.mark.e2e
def test_a_batch_too_large_for_a_chip(tpu_python):
  args = ['--config.data.crop_size=1025', '--config.batch_size=64', '--noeval']
  proc = preflight(tpu_python, *COMMON, *args, '--config.data.num_classes=150')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  (error,) = errors
  assert 'does not fit' in error and 'GiB missing' in error
  for knob in ('batch_size', 'optim.grad_accum_steps', 'model.dtype', 'crop_size'):
    assert knob in error


@pytest.mark.e2e
def test_a_bad_topology_lists_the_accepted_forms(tpu_python):
  proc = preflight(tpu_python, '--config=configs/synthetic.py', '--topology=v5litepod-8')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    f"error: --topology 'v5litepod-8': expected {aot.TOPOLOGY_FORMS}."
  ]


HLO = """
  %all-reduce-start = f32[64,3]{1,0:T(8,128)} all-reduce-start(%p), to_apply=%add
  %all-reduce-done = f32[64,3]{1,0:T(8,128)} all-reduce-done(%all-reduce-start)
  %all-reduce.1 = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce(%a, %b), to_apply=%add
  %all-gather.6 = bf16[400,10]{1,0:T(8,128)(2,1)} all-gather(%convert), dimensions={0}
  %fusion = f32[] fusion(%custom-call, %all-gather.6), kind=kOutput
  %collective-permute-start = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%x)
  %collective-permute-done = f32[8]{0} collective-permute-done(%collective-permute-start)
"""


def test_collectives_count_async_pairs_once_with_their_result_bytes():
  kinds = hbm.collectives(HLO)
  assert kinds == {
    'all-reduce': {
      'count': 2,
      'bytes': 64 * 3 * 4 + 10 * 4 + 16 * 2,
      'dtypes': {'f32': 64 * 3 * 4 + 10 * 4, 'bf16': 16 * 2},
    },
    'all-gather': {'count': 1, 'bytes': 400 * 10 * 2, 'dtypes': {'bf16': 400 * 10 * 2}},
    'collective-permute': {'count': 1, 'bytes': 8 * 4, 'dtypes': {'f32': 8 * 4}},
  }
  # A ring all-reduce sends and receives twice its bytes; the others their result once.
  reduced, others = 64 * 3 * 4 + 10 * 4 + 16 * 2, 400 * 10 * 2 + 8 * 4
  assert hbm.interconnect_bytes(kinds) == 4 * reduced + 2 * others


def test_an_out_of_memory_compile_becomes_one_message():
  program = aot.Program('train step (x)', None, (), {}, 16, 'a smaller --config.batch_size')
  text = (
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
    'temporaries (22.37G) exceeds available HBM (15.75G).'
  )
  needed, available = aot.hbm_shortfall(text, 16 * tpu_chips.GiB)
  assert (needed, available) == (int(22.37 * tpu_chips.GiB), int(15.75 * tpu_chips.GiB))
  error = aot.DoesNotFitError(program, needed, available, text)
  assert str(error) == (
    'train step (x) does not fit: 22.37 GiB a chip, 15.75 GiB available: 6.62 GiB missing. '
    'To fit: a smaller --config.batch_size.'
  )
  # On TPU7x a compiled program is one device's, half a chip.
  tpu7x = aot.DoesNotFitError(
    program, None, available, 'out of HBM', tpu_chips.CHIPS['tpu7x'].device
  )
  assert 'more than the 15.75 GiB of HBM a device (1/2 chip) has (out of HBM)' in str(tpu7x)


def test_every_chip_has_a_price_row_with_its_source_and_date_or_none():
  assert set(tpu_chips.PRICES) == set(tpu_chips.CHIPS)
  for price in filter(None, tpu_chips.PRICES.values()):
    assert price.usd_per_chip_hour > 0 and price.source.startswith('https://')
    assert datetime.date.fromisoformat(price.date)


def tpu7x_slice() -> aot.Topology:
  """tpu7x:2x2x1 without libtpu: 8 devices, 4 chips."""
  return aot.Topology('tpu7x:2x2x1', tpu_chips.CHIPS['tpu7x'], type('Mesh', (), {'size': 8}), 1)


def test_the_bill_is_chips_times_price_times_hours_or_asks_for_a_price():
  topology = tpu7x_slice()
  assert topology.chips == 4 and topology.generation == 'tpu7x'
  report = dict(run_lower_bound_s=1800.0, run_s=3600.0)
  price = tpu_chips.Price(10.0, '--price', '2026-12-04')
  assert preflight_cli.bill(report, topology, price) == (
    '>= $20, about $40 (4 chips x $10.00 a chip-hour x the hours; on-demand, --price, 2026-12-04)'
  )
  assert '--price USD' in preflight_cli.bill(report, topology, tpu_chips.PRICES['tpu7x'])


def test_tpu7x_figures_are_per_device_and_per_chip():
  chip = tpu_chips.CHIPS['tpu7x']
  assert chip.device_peak_flops == chip.peak_flops / 2
  assert chip.device_hbm_bytes == 96 * tpu_chips.GiB
  names = ('argument', 'output', 'alias', 'temp', 'generated_code')
  memory = dict.fromkeys(names, 0) | dict(total=3 * tpu_chips.GiB)
  report = dict(memory=memory, hbm_bytes=chip.device_hbm_bytes, devices_per_chip=2)
  report['headroom_bytes'] = chip.device_hbm_bytes - memory['total']
  lines = preflight_cli.format_memory(report)
  assert lines[0].startswith('  per device (1/2 chip)')
  assert lines[-1].split() == [
    'per',
    'chip',
    '6.000',
    'of',
    '192.00',
    'GiB',
    'HBM',
    '(2',
    'devices)',
  ]


def test_the_largest_batch_is_found_by_doubling_then_bisecting(monkeypatch):
  """Batch 16 on 4 chips (steps of 4), a slice that holds at most 40: 16 32 64, 48 40 44."""
  config = ml_collections.ConfigDict(dict(batch_size=16, optim=dict(grad_accum_steps=1)))
  config.optim.loss_groups = 1
  topology = aot.Topology(
    'v5e:2x2', tpu_chips.CHIPS['v5e'], mesh=type('Mesh', (), {'size': 4}), hosts=1
  )

  def build(trial, topology):
    return aot.Program('train step', None, (), {}, trial.batch_size, 'smaller')

  def compile_program(program, chip):
    if program.images_per_step > 40:
      raise aot.DoesNotFitError(program, None, chip.hbm_bytes, 'out of HBM')
    return None, 1.0

  monkeypatch.setattr(aot, 'compile_program', compile_program)
  best, tried = aot.largest_batch(config, topology, build=build, known={16: True})
  assert best == 40
  assert tried == [(16, True), (32, True), (64, False), (48, False), (40, True), (44, False)]


@pytest.mark.e2e
def test_config_mistakes_get_the_commands_one_message(tpu_python):
  """errors.report, as every command: a misspelt key says the closest one (status 2), a value
  that cannot work names its key (status 1), no traceback."""
  proc = preflight(tpu_python, *COMMON, '--config.optim.base_lrr=0.1')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Did you mean 'base_lr'?" in proc.stderr and 'Traceback' not in proc.stderr
  proc = preflight(tpu_python, *COMMON, '--config.batch_size=3')
  assert proc.returncode == 1, proc.stderr[-3000:]
  (error,) = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert 'batch_size' in error and 'Traceback' not in proc.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_the_notebooks_training_fits_colabs_one_v5e_chip(tpu_python, tmp_path):
  """Colab's TPU runtime is one v5e chip: the notebook's train.py run compiles for v5e:1x1."""
  notebook = read_notebook()
  parameters: dict = {}
  exec(notebook.cells[parameters_index(notebook)].source, parameters)  # Constants only.
  train = next(c.source for c in notebook.cells if "'train.py', '--config=" in c.source)
  assert "'--config=configs/synthetic.py'" in train  # The config compiled below.
  out = tmp_path / 'report.json'
  proc = preflight(
    tpu_python,
    '--config=configs/synthetic.py',
    '--topology=v5e:1x1',
    f'--config.num_train_steps={parameters["TRAIN_STEPS"]}',
    f'--config.batch_size={parameters["BATCH_SIZE"]}',
    f'--json={out}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['fits'] and (report['chips'], report['hosts']) == (1, 1)
  assert 0 < report['train']['memory']['total'] < tpu_chips.CHIPS['v5e'].hbm_bytes
