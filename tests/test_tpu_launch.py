"""tools/tpu_launch.py: its dry run, its commands against the code's flags, and docs/tpu.md.

The train, evaluate and prepare commands the launcher prints are parsed by the programs'
own flag definitions (train.py's absl flags and config file, psp_jax.evaluate's, the
prepare parser) and the resulting config is checked by config_checks.validate for the
slice's devices and hosts, so a renamed flag or config key fails here, not on a TPU.
"""

import json
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT, load_config, parameters_index, read_notebook

sys.path.insert(0, str(ROOT / 'tools'))
import tpu_launch  # noqa: E402

DOCS = ROOT / 'docs' / 'tpu.md'
LAUNCHER = 'python tools/tpu_launch.py'


def dry_run(argv: list[str], capsys, monkeypatch) -> str:
  """The launcher's output with --dry-run; it must not start any process."""

  def refuse(*args, **kwargs):
    raise AssertionError(f'--dry-run ran {args}')

  with monkeypatch.context() as patch:
    patch.setattr(subprocess, 'run', refuse)
    assert tpu_launch.main([*argv, '--dry-run']) == 0
  return capsys.readouterr().out


def documented_invocations() -> list[list[str]]:
  """The launcher command lines of docs/tpu.md."""
  lines = [ln.strip() for ln in DOCS.read_text().splitlines() if ln.strip().startswith(LAUNCHER)]
  return [shlex.split(ln)[2:] for ln in lines]


def remote_args(output: str, program: str) -> list[str]:
  """The arguments after `program` (e.g. 'train.py') in the printed remote scripts."""
  for block in re.split(r'^# \w+$', output, flags=re.M):
    scripts = [w for w in shlex.split(block) if w.startswith('--command=')]
    for line in (ln for script in scripts for ln in script.splitlines()):
      words = shlex.split(line)
      if program in words:
        rest = words[words.index(program) + 1 :]
        stop = ('<', '>', '>>', '&', '&&', ';')
        end = next((i for i, w in enumerate(rest) if w in stop), None)
        return rest[:end]
  raise AssertionError(f'no {program} command in:\n{output}')


def parse_with_code(kind: str, args: list[str], devices: int, hosts: int) -> dict:
  """Parses args as the program does (in a fresh process: absl flags are global)."""
  code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
kind, args = {kind!r}, {args!r}
if kind == 'prepare':
  from psp_jax.data import prepare
  print(json.dumps(vars(prepare._parser().parse_args(args))))
  sys.exit()
from absl import flags
if kind == 'train':
  import train
else:
  from psp_jax import evaluate
  evaluate.define_flags()
sys.argv = [kind, *args]  # config_flags finds the --config.KEY overrides in sys.argv.
flags.FLAGS(sys.argv)
from psp_jax.train import config_checks
config = flags.FLAGS.config
config_checks.validate(config, device_count={devices}, process_count={hosts})
print(json.dumps(dict(
  data_dir=config.data.data_dir, name=config.data.name, batch_size=config.batch_size,
  init_checkpoint=config.init_checkpoint, scales=list(config.eval.scales),
  workdir=flags.FLAGS['workdir'].value if 'workdir' in flags.FLAGS else None)))
"""
  proc = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


SINGLE = ['--tpu=psp-v5e', '--zone=us-west4-a', '--bucket=gs://my-bucket']
POD = ['--tpu=psp-v4', '--zone=us-central2-b', '--accelerator=v4-32', '--spot']
POD += ['--bucket=gs://my-bucket', '--init_checkpoint=gs://my-bucket/init/resnet50_v2.pth']


@pytest.mark.parametrize(
  ('accelerator', 'devices', 'hosts'),
  [
    ('v5litepod-1', 1, 1),
    ('v5litepod-8', 8, 1),
    ('v5litepod-16', 16, 4),
    ('v5litepod-32', 32, 8),
    ('v4-8', 4, 1),
    ('v4-32', 16, 4),
    ('v5p-8', 4, 1),
    ('v6e-8', 8, 1),
    ('v6e-16', 16, 4),
    ('tpu7x-8', 8, 1),  # 4 chips, two JAX devices each.
    ('tpu7x-16', 16, 2),
  ],
)
def test_slice_devices_and_hosts(accelerator, devices, hosts):
  assert tpu_launch.slice_of(accelerator) == tpu_launch.Slice(devices, hosts)


def test_unknown_accelerator_is_refused():
  with pytest.raises(ValueError, match='v2-8'):
    tpu_launch.slice_of('v2-8')


def test_dry_run_prints_every_command_and_runs_none(capsys, monkeypatch):
  out = dry_run([*SINGLE, *tpu_launch.STEPS], capsys, monkeypatch)
  headers = re.findall(r'^# (\w+)$', out, flags=re.M)
  assert headers == list(tpu_launch.STEPS)
  for command in tpu_launch.plan([*SINGLE, *tpu_launch.STEPS]):
    assert command.render() in out
  assert 'gcloud compute tpus tpu-vm create psp-v5e --zone=us-west4-a' in out
  assert '--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite' in out
  assert 'gcloud storage buckets create gs://my-bucket --location=us-west4' in out


def test_pod_commands_run_on_every_worker(capsys, monkeypatch):
  out = dry_run([*POD, 'create', 'install', 'prepare', 'train', 'evaluate'], capsys, monkeypatch)
  assert '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot' in out
  ssh = [ln for ln in out.splitlines() if ln.startswith('gcloud compute tpus tpu-vm ssh')]
  workers = [re.search(r'--worker=(\w+)', ln).group(1) for ln in ssh]
  # The data set is prepared once; install, train and evaluate run on all 4 hosts.
  assert workers == ['all', '0', 'all', 'all']
  assert 'torch --index-url=https://download.pytorch.org/whl/cpu' in out  # for the .pth
  assert '$HOME/init/resnet50_v2.pth' in out


def test_the_script_survives_the_shell(capsys, monkeypatch):
  """What gcloud receives as --command is the script, whatever the shell quoting."""
  argv = [*POD, '--set=eval.scales=(0.5,1.0)', 'train']
  (command,) = tpu_launch.plan(argv)
  words = shlex.split(command.render())
  assert words == command.run_argv()
  assert '"--config.eval.scales=(0.5,1.0)"' in command.script


@pytest.mark.parametrize(('argv', 'devices', 'hosts'), [(SINGLE, 8, 1), (POD, 16, 4)])
@pytest.mark.e2e
def test_train_command_parses_against_train_py(argv, devices, hosts, capsys, monkeypatch):
  out = dry_run([*argv, '--set=eval.scales=(0.5,1.0)', 'train'], capsys, monkeypatch)
  args = remote_args(out, 'train.py')
  parsed = parse_with_code('train', args, devices, hosts)
  assert parsed['name'] == 'ade20k' and parsed['batch_size'] == 16
  assert parsed['data_dir'] == 'gs://my-bucket/tensorflow_datasets'
  assert parsed['workdir'] == 'gs://my-bucket/runs/ade20k'
  assert parsed['scales'] == [0.5, 1.0]
  if '--init_checkpoint' in ' '.join(argv):
    assert parsed['init_checkpoint'] == '$HOME/init/resnet50_v2.pth'


@pytest.mark.e2e
def test_a_wrong_config_key_fails_the_check(capsys, monkeypatch):
  out = dry_run([*SINGLE, '--set=optim.base_lrr=0.1', 'train'], capsys, monkeypatch)
  with pytest.raises(AssertionError, match='base_lrr'):
    parse_with_code('train', remote_args(out, 'train.py'), 8, 1)


@pytest.mark.e2e
def test_evaluate_and_prepare_commands_parse(capsys, monkeypatch):
  out = dry_run([*POD, 'prepare', 'evaluate'], capsys, monkeypatch)
  parsed = parse_with_code('evaluate', remote_args(out, 'psp_jax.evaluate'), 16, 4)
  assert parsed['data_dir'] == 'gs://my-bucket/tensorflow_datasets'
  prepared = parse_with_code('prepare', remote_args(out, 'psp_jax.data.prepare'), 1, 1)
  assert prepared['name'] == 'ade20k' and prepared['data_dir'].startswith('gs://my-bucket/')
  assert prepared['manual_dir'] == '$HOME/data'


def test_a_slice_of_more_devices_than_images_splits_each_image(capsys):
  argv = ['--tpu=t', '--zone=us-west4-a', '--bucket=gs://b', '--accelerator=v5litepod-32']
  script = tpu_launch.plan([*argv, 'train'])[0].script
  assert '--config.spatial_partitions=2' in script  # 16 images x 2 devices: 32 devices.
  assert 'each split over 2 devices' in script
  preflight = tpu_launch.plan([*argv, 'preflight'])[0]
  assert '--config.spatial_partitions=2' in preflight.argv
  v5e_64 = [*argv[:3], '--accelerator=v5litepod-64', 'train']
  assert '--config.spatial_partitions=4' in tpu_launch.plan(v5e_64)[0].script
  # A batch that fills the slice needs no split; one that no split fits is refused.
  commands = tpu_launch.plan([*argv, '--set=batch_size=32', 'train'])
  assert '--config.batch_size=32' in commands[0].script
  assert 'spatial_partitions' not in commands[0].script
  assert tpu_launch.main([*argv, '--dry-run', '--set=batch_size=3', 'train']) == 2
  err = capsys.readouterr().err
  assert 'batch_size=64' in err and 'spatial_partitions' in err


def test_spatial_partitions_are_the_fewest_that_fit():
  assert tpu_launch.spatial_partitions(8, 1, 16) == 1
  assert tpu_launch.spatial_partitions(32, 8, 16) == 2
  assert tpu_launch.spatial_partitions(64, 16, 16) == 4
  assert tpu_launch.spatial_partitions(64, 16, 8) == 8  # spans two hosts of 4 devices
  assert tpu_launch.spatial_partitions(32, 8, 3) is None


def test_the_guide_shows_exactly_what_the_launcher_prints():
  """Every command of every launcher line in docs/tpu.md is in the guide, and every
  `gcloud compute tpus` command in the guide comes from one of them."""
  text = DOCS.read_text()
  invocations = documented_invocations()
  assert len(invocations) >= 2, 'docs/tpu.md should show the single-host and pod launches'
  assert '--worker=all' in text and '--accelerator=v4-32' in text
  rest = text
  assert sum('--dry-run' in argv for argv in invocations) >= 2
  for argv in invocations:
    for command in tpu_launch.plan([a for a in argv if a != '--dry-run']):
      assert command.render() in text, f'docs/tpu.md lacks, from {argv}:\n{command.render()}'
      rest = rest.replace(command.render(), '')
  stale = [ln for ln in rest.splitlines() if 'gcloud compute tpus' in ln and '`' not in ln]
  assert not stale, f'commands in docs/tpu.md that the launcher does not print: {stale}'


def test_launcher_constants_match_the_config_and_the_notebook():
  """The batch sizes the launcher checks are configs/ade20k.py's, and it installs from the
  same repository as the Colab notebook."""

  config = load_config('ade20k')
  assert (config.batch_size, config.eval.batch_size) == (
    tpu_launch.OFFICIAL_BATCH,
    tpu_launch.OFFICIAL_EVAL_BATCH,
  )
  notebook = read_notebook()
  parameters = notebook.cells[parameters_index(notebook)].source
  assert f"REPO_URL = '{tpu_launch.REPO_URL}'" in parameters


@pytest.mark.parametrize(
  ('accelerator', 'topology'),
  [
    ('v5litepod-8', 'v5e:2x4'),
    ('v5litepod-16', 'v5e:4x4'),
    ('v4-8', 'v4:2x2x1'),
    ('v4-32', 'v4:2x2x4'),
    ('v5p-8', 'v5p:2x2x1'),
    ('v6e-8', 'v6e:2x4'),
    ('v5litepod-1', 'v5e:1x1'),
    ('tpu7x-8', 'tpu7x:2x2x1'),
    ('tpu7x-16', 'tpu7x:2x2x2'),
  ],
)
def test_accelerator_topology(accelerator, topology):
  assert tpu_launch.topology_of(accelerator) == topology


def preflight_flags(args: list[str]) -> dict:
  """The preflight arguments as psp_jax.preflight's own flags parse them (a fresh process)."""
  code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from absl import flags
from psp_jax import preflight
preflight.define_flags()
sys.argv = ['preflight', *{args!r}]
flags.FLAGS(sys.argv)
config = flags.FLAGS.config
print(json.dumps(dict(topology=flags.FLAGS.topology, batch_size=config.batch_size,
  eval_batch_size=config.eval.batch_size, depth=config.model.depth)))
"""
  proc = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_preflight_command_parses_against_the_preflight(capsys, monkeypatch):
  """The preflight runs here, before create, with the train step's config and overrides."""
  argv = [*POD, '--set=model.depth=101', 'preflight', 'create']
  out = dry_run(argv, capsys, monkeypatch)
  assert re.findall(r'^# (\w+)$', out, flags=re.M) == ['preflight', 'create']
  (preflight, _) = tpu_launch.plan(argv)
  assert preflight.argv[:3] == (tpu_launch.PREFLIGHT_PYTHON, '-m', 'psp_jax.preflight')
  assert preflight.cwd == ROOT and preflight.script is None
  parsed = preflight_flags(list(preflight.argv[3:]))
  assert parsed == dict(topology='v4:2x2x4', batch_size=16, eval_batch_size=16, depth=101)


class FakeRun:
  """subprocess.run for main(): records each command, exits as `codes` says per step."""

  def __init__(self, codes: dict[str, int]):
    self.codes, self.calls = codes, []

  def __call__(self, argv, cwd=None):
    step = 'preflight' if 'psp_jax.preflight' in argv else argv[4]  # gcloud compute tpus tpu-vm X
    self.calls.append((step, argv, cwd))
    return subprocess.CompletedProcess(argv, self.codes.get(step, 0))


def test_a_slice_that_fits_is_created(capsys, monkeypatch):
  fake = FakeRun({'preflight': 0})
  monkeypatch.setattr(subprocess, 'run', fake)
  assert tpu_launch.main([*SINGLE, 'preflight', 'create']) == 0
  assert [step for step, _, _ in fake.calls] == ['preflight', 'create']
  assert fake.calls[0][2] == ROOT and '--topology=v5e:2x4' in fake.calls[0][1]
  assert '--accelerator-type=v5litepod-8' in fake.calls[1][1]


def test_a_slice_the_config_does_not_fit_is_refused(capsys, monkeypatch):
  fake = FakeRun({'preflight': 1})
  monkeypatch.setattr(subprocess, 'run', fake)
  assert tpu_launch.main([*SINGLE, '--set=batch_size=512', 'preflight', 'create']) == 1
  assert [step for step, _, _ in fake.calls] == ['preflight']  # Nothing was created.
  err = capsys.readouterr().err
  assert 'configs/ade20k.py on v5litepod-8: the config was refused' in err
  assert 'no later step' in err


def test_a_crashed_preflight_stops_the_launch_without_a_verdict(capsys, monkeypatch):
  fake = FakeRun({'preflight': -11})  # libtpu's SIGSEGV.
  monkeypatch.setattr(subprocess, 'run', fake)
  assert tpu_launch.main([*SINGLE, '--accelerator=v6e-8', 'preflight', 'create']) == 1
  assert [step for step, _, _ in fake.calls] == ['preflight']
  assert 'crashed (signal 11) and gave no verdict' in capsys.readouterr().err


def test_preflight_without_its_venv_says_how_to_make_it(capsys, monkeypatch):
  def missing(argv, cwd=None):
    raise FileNotFoundError(argv[0])

  monkeypatch.setattr(subprocess, 'run', missing)
  assert tpu_launch.main([*SINGLE, 'preflight', 'create']) == 2
  assert 'make preflight-setup' in capsys.readouterr().err
