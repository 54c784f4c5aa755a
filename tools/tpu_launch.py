"""Cloud TPU launcher: the gcloud commands of docs/tpu.md, printed (--dry-run) or run.

  python tools/tpu_launch.py --tpu=psp-v5e --zone=us-west4-a --bucket=gs://my-bucket \\
      --dry-run preflight create install prepare train

Each step is one command on this machine; the steps on the TPU VM go through
`gcloud compute tpus tpu-vm ssh` (on every worker of a pod slice with --worker=all).
`preflight` compiles the training for the slice here, with libtpu in .venv-tpu (`make
preflight-setup`), and stops the later steps when the config does not fit its chips.
Standard library only: it runs wherever gcloud does.
"""

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

# The newest software image of each TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
  'v4': 'tpu-ubuntu2204-base',
  'v5litepod': 'v2-alpha-tpuv5-lite',
  'v5p': 'v2-alpha-tpuv5',
  'v6e': 'v2-alpha-tpuv6e',
  'tpu7x': 'v2-alpha-tpu7-ubuntu2404',
}
REPO_URL = 'https://github.com/psp-jax/psp-jax.git'
ROOT = pathlib.Path(__file__).resolve().parents[1]  # The preflight runs in this checkout.
# The pre-flight's venv (Makefile: preflight-setup), relative to ROOT.
PREFLIGHT_PYTHON = '.venv-tpu/bin/python'
# Slice shapes of the Cloud TPU types, by chips (cloud.google.com/tpu/docs/v5e, v6e, v4, v5p,
# tpu7x).
_SHAPES_2D = {
  1: '1x1',
  4: '2x2',
  8: '2x4',
  16: '4x4',
  32: '4x8',
  64: '8x8',
  128: '8x16',
  256: '16x16',
}
_SHAPES_3D = {
  4: '2x2x1',
  8: '2x2x2',
  16: '2x2x4',
  32: '2x4x4',
  64: '4x4x4',
  128: '4x4x8',
  256: '4x8x8',
}
_GENERATIONS = {'v4': 'v4', 'v5litepod': 'v5e', 'v5p': 'v5p', 'v6e': 'v6e', 'tpu7x': 'tpu7x'}
_TWO_CORES = ('v4', 'v5p', 'tpu7x')  # Types whose N counts TensorCores, two a chip.
ADE20K_URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
# On every worker (the images ship Python 3.10; uv brings a 3.12 for the project).
REPO, VENV = '$HOME/psp-jax', '$HOME/psp-venv'
PYTHON = f'{VENV}/bin/python'
LOG = '$HOME/train.log'
OFFICIAL_BATCH = 16  # configs/ade20k.py: batch_size (global).
OFFICIAL_EVAL_BATCH = 8  # and eval.batch_size.
STEPS = (
  'bucket',
  'preflight',
  'create',
  'install',
  'prepare',
  'train',
  'logs',
  'tensorboard',
  'status',
  'evaluate',
  'delete',
)


@dataclass(frozen=True)
class Slice:
  """A TPU type's JAX devices and hosts (processes of a training run)."""

  devices: int
  hosts: int


def slice_of(accelerator: str) -> Slice:
  """Devices and hosts of an accelerator type such as v5litepod-8 or v4-32.

  v4, v5p and tpu7x count TensorCores, two per chip: JAX sees one device per chip on v4
  and v5p (megacore), one per TensorCore on tpu7x (tpu7x-8: 4 chips, 8 devices). v5e
  (v5litepod) and v6e count chips. A host has 4 chips, except the single-host 8-chip v5e
  and v6e machines.
  """
  match = re.fullmatch(r'(v4|v5litepod|v5p|v6e|tpu7x)-(\d+)', accelerator)
  if not match:
    raise ValueError(
      f'--accelerator {accelerator}: expected v4-N, v5litepod-N, v5p-N, v6e-N or tpu7x-N '
      '(e.g. v5litepod-8, v4-32, tpu7x-8)'
    )
  family, count = match.group(1), int(match.group(2))
  chips = count // 2 if family in _TWO_CORES else count
  hosts = 1 if chips <= (8 if family in ('v5litepod', 'v6e') else 4) else chips // 4
  return Slice(devices=count if family == 'tpu7x' else chips, hosts=hosts)


def topology_of(accelerator: str) -> str:
  """The libtpu topology name of an accelerator type, e.g. v5litepod-8 -> 'v5e:2x4'.

  Raises:
    ValueError: a type without a known slice shape.
  """
  family = accelerator.split('-')[0]
  chips = slice_of(accelerator).devices // (2 if family == 'tpu7x' else 1)
  shapes = _SHAPES_3D if family in _TWO_CORES else _SHAPES_2D
  if chips not in shapes:
    raise ValueError(f'--accelerator {accelerator}: no slice shape known for {chips} chips')
  return f'{_GENERATIONS[family]}:{shapes[chips]}'


# The most devices the launcher splits an image over: at the recipe's 473 crop layer4 has 60
# rows, so 8 leaves a device 7-8 rows, more than its dilation-4 convolutions' halo of 4.
MAX_SPACE = 8


def spatial_partitions(devices: int, hosts: int, batch: int) -> int | None:
  """The fewest devices to split each image over so that `batch` images fill the slice.

  1 when the batch already splits over the devices; None when no split of up to MAX_SPACE
  devices (dividing, or a multiple of, a host's devices) makes it.
  """
  local = devices // hosts
  for space in range(1, min(devices, MAX_SPACE) + 1):
    fits_hosts = local % space == 0 or space % local == 0
    if devices % space == 0 and fits_hosts and batch % (devices // space) == 0:
      return space
  return None


@dataclass(frozen=True)
class Command:
  """One step: a command run here (for ssh steps, `script` runs on the TPU VM).

  `cwd` is where a local command runs (the preflight: this checkout), None for gcloud.
  """

  step: str
  argv: tuple[str, ...]
  script: str | None = None
  cwd: pathlib.Path | None = None

  def render(self) -> str:
    """The command as a shell line; the remote script stays readable, one line each."""
    line = ' '.join(_quote(word) for word in self.argv)
    if self.script is not None:
      line += f' --command={shlex.quote(self.script)}'
    return line

  def run_argv(self) -> list[str]:
    return [*self.argv, f'--command={self.script}'] if self.script is not None else [*self.argv]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python tools/tpu_launch.py',
    description=__doc__.split('\n')[0],
    epilog='Steps: ' + ', '.join(STEPS) + '. docs/tpu.md explains each.',
  )
  parser.add_argument('steps', nargs='+', choices=STEPS, metavar='STEP', help='what to do')
  parser.add_argument('--tpu', required=True, help='TPU VM name')
  parser.add_argument('--zone', required=True, help='e.g. us-west4-a (v5e), us-central2-b (v4)')
  parser.add_argument('--project', help='Google Cloud project (default: gcloud config)')
  parser.add_argument('--accelerator', default='v5litepod-8', help='TPU type (v5litepod-8)')
  parser.add_argument('--version', help='TPU software image (default: by TPU generation)')
  parser.add_argument('--spot', action='store_true', help='Spot VM: cheaper, can be preempted')
  parser.add_argument('--bucket', help='gs://BUCKET for the data set and the run')
  parser.add_argument('--run', default='ade20k', help='run name: workdir BUCKET/runs/RUN')
  parser.add_argument('--config', default='configs/ade20k.py', help='training config file')
  parser.add_argument(
    '--init_checkpoint', help='gs:// path of the ImageNet backbone, e.g. resnet50_v2.pth'
  )
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='config override for train and evaluate (repeatable), e.g. --set batch_size=32',
  )
  parser.add_argument('--repo', default=REPO_URL, help='git repository to install')
  parser.add_argument('--ref', default='main', help='its branch or tag')
  parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  return parser


class Plan:
  """The commands of each step for one set of arguments."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.slice = slice_of(args.accelerator)
    family = args.accelerator.split('-')[0]
    self.version = args.version or RUNTIME_VERSIONS[family]
    self.overrides = dict(_key_value(s) for s in args.set)
    if args.bucket is not None and not re.fullmatch(r'gs://[a-z0-9][-_.a-z0-9]*', args.bucket):
      raise ValueError(f'--bucket {args.bucket}: expected gs://BUCKET (no path)')

  # Paths in the bucket.
  def _bucket(self, step: str) -> str:
    if not self.args.bucket:
      raise ValueError(f'step {step} needs --bucket gs://BUCKET')
    return self.args.bucket

  def data_dir(self, step: str) -> str:
    return f'{self._bucket(step)}/tensorflow_datasets'

  def workdir(self, step: str) -> str:
    return f'{self._bucket(step)}/runs/{self.args.run}'

  def dataset(self) -> str:
    return re.sub(r'\.py$', '', self.args.config.rsplit('/', 1)[-1])

  # gcloud.
  def _gcloud(self, *words: str) -> tuple[str, ...]:
    project = (f'--project={self.args.project}',) if self.args.project else ()
    return ('gcloud', 'compute', 'tpus', 'tpu-vm', *words, *project)

  def _ssh(self, step: str, lines: list[str], worker: str = 'all', *extra: str) -> Command:
    argv = self._gcloud('ssh', self.args.tpu, f'--zone={self.args.zone}', f'--worker={worker}')
    return Command(step, (*argv, *extra), '\n'.join(lines))

  def config_flags(self, step: str, data: bool = True) -> list[str]:
    """--config.KEY=VALUE of every run: the data in the bucket (if `data`), then --set.

    Validation batches must split over the devices too: beyond 8 devices (the config's
    eval.batch_size) each device takes one image.
    """
    values = {'data.data_dir': self.data_dir(step)} if data else {}
    if OFFICIAL_EVAL_BATCH % self.slice.devices:
      values['eval.batch_size'] = self.slice.devices
    if (self.space() or 1) > 1:  # --set's own value, if given, replaces it below.
      values['spatial_partitions'] = self.space()
    values.update(self.overrides)
    return [f'--config.{k}={v}' for k, v in values.items()]

  def batch(self) -> int:
    return int(self.overrides.get('batch_size', OFFICIAL_BATCH))

  def space(self) -> int | None:
    """config.spatial_partitions of the run: --set's, else the fewest that fit the batch."""
    if 'spatial_partitions' in self.overrides:
      return int(self.overrides['spatial_partitions'])
    return spatial_partitions(self.slice.devices, self.slice.hosts, self.batch())

  def preflight_argv(self) -> list[str]:
    """psp_jax.preflight's arguments: the training's config and overrides, the slice."""
    argv = [f'--config={self.args.config}', f'--topology={topology_of(self.args.accelerator)}']
    return argv + self.config_flags('preflight', data=False)

  def train_argv(self) -> list[str]:
    """train.py's arguments (after `python train.py`), as the train step runs them."""
    argv = [f'--config={self.args.config}', f'--workdir={self.workdir("train")}']
    argv += self.config_flags('train')
    if self.args.init_checkpoint:
      local = '$HOME/init/' + self.args.init_checkpoint.rsplit('/', 1)[-1]
      argv.append(f'--config.init_checkpoint={local}')
    return argv

  def evaluate_argv(self) -> list[str]:
    """psp_jax.evaluate's arguments, on the best checkpoint copied out of the bucket."""
    argv = [f'--config={self.args.config}', '--checkpoint=$HOME/psp-eval']
    return argv + ['--output_dir=$HOME/psp-eval/results'] + self.config_flags('evaluate')

  def prepare_argv(self) -> list[str]:
    return ['ade20k', '--manual_dir=$HOME/data', f'--data_dir={self.data_dir("prepare")}']

  def step(self, name: str) -> list[Command]:
    """The commands of one step."""
    args = self.args
    if name == 'bucket':
      region = args.zone.rsplit('-', 1)[0]  # Same region as the TPU: no egress, low latency.
      argv = ('gcloud', 'storage', 'buckets', 'create', self._bucket(name), f'--location={region}')
      project = (f'--project={args.project}',) if args.project else ()
      return [Command(name, argv + project)]
    if name == 'preflight':
      argv = (PREFLIGHT_PYTHON, '-m', 'psp_jax.preflight', *self.preflight_argv())
      return [Command(name, argv, cwd=ROOT)]
    if name == 'create':
      argv = self._gcloud('create', args.tpu, f'--zone={args.zone}')
      argv += (f'--accelerator-type={args.accelerator}', f'--version={self.version}')
      return [Command(name, argv + (('--spot',) if args.spot else ()))]
    if name == 'install':
      lines = [
        'set -e',
        f'test -d {REPO} || git clone --depth=1 --branch={args.ref} {args.repo} {REPO}',
        f'git -C {REPO} pull --ff-only',
        'command -v uv || curl -LsSf https://astral.sh/uv/install.sh | sh',
        'export PATH=$HOME/.local/bin:$PATH',
        f'test -x {PYTHON} || uv venv --python=3.12 {VENV}',
        f'uv pip install --python={PYTHON} --upgrade -e "{REPO}[data]" "jax[tpu]"',
        # Reading .pth files (the ImageNet backbone, official checkpoints): a CPU build.
        f'uv pip install --python={PYTHON} torch --index-url=https://download.pytorch.org/whl/cpu',
        f'{PYTHON} -c "import jax; print(jax.process_index(), jax.devices())"',
      ]
      return [self._ssh(name, lines)]
    if name == 'prepare':
      if self.dataset() != 'ade20k':
        raise ValueError(
          f'prepare downloads ADE20K only; for {args.config} put the files on worker 0 and run '
          'python -m psp_jax.data.prepare there (docs/tpu.md).'
        )
      archive = '$HOME/data/ADEChallengeData2016.zip'  # prepare reads the archive itself.
      lines = [
        'set -e',
        'mkdir -p $HOME/data',
        f'test -f {archive} || curl -fL -o {archive} {ADE20K_URL}',
        f'cd {REPO} && {PYTHON} -m psp_jax.data.prepare {shell_words(self.prepare_argv())}',
      ]
      return [self._ssh(name, lines, worker='0')]
    if name == 'train':
      batch, space, devices = self.batch(), self.space(), self.slice.devices
      if not space or devices % space or batch % (devices // space):
        raise ValueError(
          f'{args.accelerator} has {devices} devices: the global batch {batch} does not '
          f'split over them, even with each image split over up to {MAX_SPACE} devices; '
          f'pass --set batch_size={devices * 2} (a multiple), or --set spatial_partitions=N.'
        )
      lines = ['set -e']
      if space > 1:
        lines.append(
          f'# {devices} devices for a batch of {batch}: {devices // space} images at a time, '
          f'each split over {space} devices (config.spatial_partitions={space}).'
        )
      if args.init_checkpoint:
        lines.append(f'mkdir -p $HOME/init && gcloud storage cp {args.init_checkpoint} $HOME/init/')
      train = shell_words([PYTHON, 'train.py', *self.train_argv()])
      lines.append(f'cd {REPO} && nohup {train} < /dev/null >> {LOG} 2>&1 &')
      return [self._ssh(name, lines)]
    if name == 'logs':
      return [self._ssh(name, [f'tail -n 30 {LOG}'], worker='0')]
    if name == 'tensorboard':
      lines = [f'{VENV}/bin/tensorboard --logdir={self.workdir(name)} --port=6006']
      return [self._ssh(name, lines, '0', '--ssh-flag=-L 6006:localhost:6006')]
    if name == 'status':
      argv = self._gcloud('describe', args.tpu, f'--zone={args.zone}', '--format=value(state)')
      return [Command(name, argv)]
    if name == 'evaluate':
      evaluate = shell_words([PYTHON, '-m', 'psp_jax.evaluate', *self.evaluate_argv()])
      lines = [
        'set -e',
        'rm -rf $HOME/psp-eval && mkdir -p $HOME/psp-eval',
        f'gcloud storage cp -r {self.workdir(name)}/best $HOME/psp-eval/',
        f'cd {REPO} && {evaluate}',
        'if test -d $HOME/psp-eval/results; then gcloud storage cp -r $HOME/psp-eval/results '
        f'{self.workdir(name)}/eval; fi',
      ]
      return [self._ssh(name, lines)]
    if name == 'delete':
      return [Command(name, self._gcloud('delete', args.tpu, f'--zone={args.zone}', '--quiet'))]
    raise ValueError(f'unknown step {name}')


def _quote(word: str) -> str:
  """shlex.quote, but --flag='a b' rather than '--flag=a b'."""
  flag, sep, value = word.partition('=')
  if sep and re.fullmatch(r'--[-\w]+', flag) and shlex.quote(value) != value:
    return f'{flag}={shlex.quote(value)}'
  return shlex.quote(word)


def shell_words(words: list[str]) -> str:
  """Words for the remote shell, inside the single-quoted --command: $HOME still expands.

  Plain words stay bare; others (a tuple override such as eval.scales=(0.5,1.0)) go in
  double quotes.
  """
  out = []
  for word in words:
    if re.fullmatch(r'[-\w@%+=:,./$]+', word):
      out.append(word)
    elif not re.search(r'[\'"\\`!]', word):
      out.append(f'"{word}"')
    else:
      raise ValueError(f'{word!r}: quotes, backslashes, backticks and ! are not supported')
  return ' '.join(out)


def _key_value(text: str) -> tuple[str, str]:
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise ValueError(f'--set {text}: expected KEY=VALUE, e.g. batch_size=32')
  return key, value


def plan(argv: list[str]) -> list[Command]:
  """The commands for a command line, in the order of its steps."""
  args = _parser().parse_args(argv)
  steps = Plan(args)
  return [command for name in args.steps for command in steps.step(name)]


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = _parser().parse_args(argv)
  try:
    commands = plan(argv)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for command in commands:
    print(f'# {command.step}')
    print(command.render(), flush=True)
    if args.dry_run:
      continue
    try:
      result = subprocess.run(command.run_argv(), cwd=command.cwd)
    except FileNotFoundError:
      hint = ': run `make preflight-setup` first' if command.step == 'preflight' else ''
      print(f'error: step {command.step}: {command.argv[0]} not found{hint}', file=sys.stderr)
      return 2
    if result.returncode and command.step == 'preflight':
      # A negative code is a signal: libtpu crashed while compiling, which says nothing
      # about the fit (seen for v6e with libtpu 0.0.42.1; benchmarks/results).
      verdict = (
        f'the pre-flight crashed (signal {-result.returncode}) and gave no verdict'
        if result.returncode < 0
        else 'the config was refused (the message above)'
      )
      print(
        f'error: {args.config} on {args.accelerator}: {verdict}; no later step was run.',
        file=sys.stderr,
      )
      return result.returncode if result.returncode > 0 else 1
    if result.returncode:
      print(f'error: step {command.step} failed (exit code {result.returncode})', file=sys.stderr)
      return result.returncode
  return 0


if __name__ == '__main__':
  sys.exit(main())
