"""Every command line refuses a mistake with one short message, no traceback, and writes nothing.

Each case runs the real command as a subprocess, as a user would, and checks the exit
status, that stderr is a few lines naming the thing at fault, and that files written before
are byte for byte unchanged. PSP_JAX_TRACEBACK=1 brings the traceback back.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from psp_jax import weights
from psp_jax.models import PSPNet

from faults import damage  # noqa: I001 (tests/ is on sys.path)
from helpers import ROOT, random_variables, refused

pytestmark = pytest.mark.e2e
MODEL = dict(num_classes=11, depth=18, width=4, head_channels=8, aux_channels=8)


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
  environ = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PSP_JAX_TRACEBACK')}
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=environ | env,
    timeout=600,
  )


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """An 11-class weights directory (random weights: the refusals come before any use)."""
  path = tmp_path_factory.mktemp('cli') / 'weights'
  weights.save_variables(path, random_variables(PSPNet(**MODEL), seed=1), MODEL)
  return path


def snapshot(folder) -> dict[str, bytes]:
  return {str(p): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_misspelt_config_key_names_the_closest(tmp_path):
  proc = run(
    'train.py',
    '--config=configs/synthetic.py',
    f'--workdir={tmp_path / "run"}',
    '--config.optim.base_lrr=0.1',
  )
  refused(proc, 2, '--config.optim.base_lrr', "'base_lr'")
  assert not (tmp_path / 'run').exists()
  proc = run(
    '-m',
    'psp_jax.evaluate',
    '--config=configs/synthetic.py',
    '--checkpoint=x',
    '--config.eval.flipp=False',
  )
  refused(proc, 2, '--config.eval.flipp', "'flip'")


def test_unknown_flag_and_missing_flags(tmp_path):
  refused(run('train.py', '--bogus'), 2, 'bogus')
  refused(run('-m', 'psp_jax.predict', '--checkpoint=x'), 2, '--input')


def test_predict_input_missing_or_not_an_image(tmp_path, checkpoint):
  out = tmp_path / 'out'
  refused(
    run(
      '-m',
      'psp_jax.predict',
      f'--checkpoint={checkpoint}',
      f'--input={tmp_path / "nowhere.png"}',
      f'--output={out}',
    ),
    1,
    'nowhere.png',
  )
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  proc = run(
    '-m', 'psp_jax.predict', f'--checkpoint={checkpoint}', f'--input={text}', f'--output={out}'
  )
  refused(proc, 1, 'notes.png')
  # With the switch, the traceback is there for a bug report.
  proc = run(
    '-m',
    'psp_jax.predict',
    f'--checkpoint={checkpoint}',
    f'--input={text}',
    f'--output={out}',
    PSP_JAX_TRACEBACK='1',
  )
  assert proc.returncode == 1 and 'Traceback' in proc.stderr


def test_output_path_that_is_a_file_is_refused_before_work(tmp_path, checkpoint):
  image = tmp_path / 'in.png'
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(image)
  occupied = tmp_path / 'results'
  occupied.write_text('my notes')
  proc = run(
    '-m',
    'psp_jax.predict',
    f'--checkpoint={checkpoint}',
    f'--input={image}',
    f'--output={occupied}',
  )
  refused(proc, 1, str(occupied), 'is a file')
  proc = run(
    '-m',
    'psp_jax.evaluate',
    '--config=configs/synthetic.py',
    f'--checkpoint={checkpoint}',
    f'--output_dir={occupied}',
  )
  refused(proc, 1, str(occupied), 'is a file')
  assert occupied.read_text() == 'my notes'


def test_existing_results_are_not_overwritten(tmp_path, checkpoint):
  image = tmp_path / 'in.png'
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(image)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'in_color.png').write_bytes(b'earlier result')
  (out / 'results.json').write_text('{"mIoU": 0.5}')
  before = snapshot(out)
  proc = run(
    '-m', 'psp_jax.predict', f'--checkpoint={checkpoint}', f'--input={image}', f'--output={out}'
  )
  refused(proc, 1, 'in_color.png', '--overwrite')
  proc = run(
    '-m',
    'psp_jax.evaluate',
    '--config=configs/synthetic.py',
    f'--checkpoint={checkpoint}',
    f'--output_dir={out}',
  )
  refused(proc, 1, 'results.json', '--overwrite')
  assert snapshot(out) == before


def test_a_config_file_missing_or_broken_is_one_message_before_anything(tmp_path):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  return (\n')
  failing = tmp_path / 'failing.py'
  failing.write_text('def get_config():\n  return undefined_name\n')
  workdir = tmp_path / 'run'
  for config, words in [
    ('configs/nope.py', ('--config configs/nope.py: no such file', 'configs/synthetic.py')),
    (broken, (f'--config {broken} fails to load: SyntaxError', '(line 2)')),
    (failing, (f'--config {failing} fails to load: NameError', 'undefined_name', '(line 2)')),
  ]:
    refused(run('train.py', f'--config={config}', f'--workdir={workdir}'), 2, *words)
    assert not workdir.exists()
  proc = run('-m', 'psp_jax.evaluate', '--config=configs/nope.py', '--checkpoint=x')
  refused(proc, 2, '--config configs/nope.py: no such file')


def test_a_missing_init_checkpoint_or_list_file_is_refused_before_the_workdir(tmp_path):
  workdir = tmp_path / 'run'
  tiny = ['--config.num_train_steps=1', '--config.model.depth=18', '--config.model.width=4']
  proc = run(
    'train.py',
    '--config=configs/synthetic.py',
    f'--workdir={workdir}',
    f'--config.init_checkpoint={tmp_path / "resnet50_v2.pth"}',
    f'--config.data.data_dir={tmp_path / "tfds"}',
    *tiny,
  )
  refused(proc, 1, f'config.init_checkpoint={tmp_path / "resnet50_v2.pth"}: no such file')
  assert not workdir.exists()
  (tmp_path / 'train.txt').write_text('images/a.jpg labels/a.png\n')
  lists = ['--config.data.name=list', f'--config.data.root={tmp_path}']
  lists += ['--config.data.train_list=train.txt', '--config.data.val_list=val.txt']
  proc = run('train.py', '--config=configs/synthetic.py', f'--workdir={workdir}', *lists, *tiny)
  refused(proc, 1, 'list source (train): 2 files do not exist', 'images/a.jpg')
  (tmp_path / 'images').mkdir()
  (tmp_path / 'labels').mkdir()
  Image.new('RGB', (8, 8)).save(tmp_path / 'images' / 'a.jpg')
  Image.new('L', (8, 8)).save(tmp_path / 'labels' / 'a.png')
  proc = run('train.py', '--config=configs/synthetic.py', f'--workdir={workdir}', *lists, *tiny)
  refused(proc, 1, 'config.data.val_list = val.txt is not a file')  # Validation's, up front.
  assert not workdir.exists()


def test_every_command_refuses_a_missing_file_argument_before_writing(tmp_path):
  nowhere, out, images = tmp_path / 'nowhere', tmp_path / 'out', tmp_path / 'images'
  images.mkdir()
  Image.new('RGB', (48, 40)).save(images / 'a.png')
  for args, words in [
    (['-m', 'psp_jax.convert', f'{nowhere}.pth', str(out)], ('no such file', 'nowhere.pth')),
    (
      [
        '-m',
        'psp_jax.evaluate',
        '--config=configs/synthetic.py',
        f'--checkpoint={nowhere}',
        f'--output_dir={out}',
      ],
      ('no such checkpoint', str(nowhere)),
    ),
    (
      [
        '-m',
        'psp_jax.predict',
        f'--checkpoint={nowhere}',
        f'--input={tmp_path}',
        f'--output={out}',
      ],
      ('no such checkpoint', str(nowhere)),
    ),
    (
      ['-m', 'psp_jax.predict', f'--exported={nowhere}', f'--input={tmp_path}', f'--output={out}'],
      ('--exported', 'no such folder'),
    ),
    (
      ['-m', 'psp_jax.data.prepare', 'ade20k', f'--manual_dir={nowhere}', f'--data_dir={out}'],
      (str(nowhere), 'does not hold ADE20K'),
    ),
  ]:
    refused(run(*args), 1, *words)
    assert not out.exists(), args


def test_a_damaged_weights_directory_is_refused_by_every_reader(tmp_path, checkpoint):
  """Bytes flipped in its array data (bit rot): refused with one message, naming it."""
  damaged = tmp_path / 'weights'
  shutil.copytree(checkpoint, damaged)
  damage(damaged / weights.VARIABLES_DIR, 'flipped')
  (tmp_path / 'images').mkdir()
  Image.new('RGB', (48, 40)).save(tmp_path / 'images' / 'a.png')
  out = tmp_path / 'out'
  commands = [
    ['psp_jax.predict', f'--input={tmp_path / "images"}', f'--output={out}'],
    ['psp_jax.export', '--size=65x65', '--format=stablehlo', f'--output={out}'],
    ['psp_jax.evaluate', '--config=configs/voc2012.py', f'--output_dir={out}'],
  ]
  for module, *args in commands:
    message = refused(run('-m', module, f'--checkpoint={damaged}', *args), 1)
    assert f'{damaged}' in message and ('is damaged' in message or 'cannot be read' in message)
  assert not out.exists()


def test_checkpoint_of_another_data_set(checkpoint):
  proc = run('-m', 'psp_jax.evaluate', '--config=configs/voc2012.py', f'--checkpoint={checkpoint}')
  refused(proc, 1, 'predicts 11 classes', 'num_classes is 21')


def test_list_file_with_spaces_says_how_to_write_the_line(tmp_path):
  (tmp_path / 'list.txt').write_text('images/a b.jpg labels/a b.png\n')
  proc = run(
    'train.py',
    '--config=configs/synthetic.py',
    f'--workdir={tmp_path / "run"}',
    '--config.data.name=list',
    f'--config.data.root={tmp_path}',
    '--config.data.train_list=list.txt',
    '--config.data.val_list=list.txt',
    '--config.num_train_steps=1',
    '--config.model.depth=18',
    '--config.model.width=4',
  )
  refused(proc, 1, 'list.txt:1', 'TAB')


def test_none_for_a_tuple_key_is_off_or_refused_naming_the_key(tmp_path, checkpoint):
  # --config.data.rotate_range=None is None (no rotation), not (None,): the mmseg recipe,
  # which refuses any rotation, accepts it; a key that needs a tuple says which and how.
  proc = run(
    'train.py',
    '--config=configs/synthetic.py',
    f'--workdir={tmp_path / "run"}',
    '--config.data.rotate_range=None',
    '--config.data.recipe=mmseg',
    '--config.data.blur=False',
    '--config.data.mmseg.scale',  # the `--flag value` form
    'None',
  )
  refused(proc, 1, 'data.mmseg.scale', "--config.data.mmseg.scale='(2048, 512)'")
  assert not (tmp_path / 'run').exists()
  proc = run(
    '-m',
    'psp_jax.evaluate',
    '--config=configs/synthetic.py',
    f'--checkpoint={checkpoint}',
    '--config.eval.scales=None',
  )
  refused(proc, 1, 'config.eval.scales', "--config.eval.scales='(1.0,)'")
