"""Tests of the prepare command (python -m psp_jax.data.prepare)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from psp_jax.data import prepare

import datagen


def run_prepare(argv: list[str]) -> int:
  """prepare.main's exit status: returned when it succeeds, raised (SystemExit) when not."""
  try:
    return prepare.main(argv)
  except SystemExit as e:
    return e.code


def test_prepares_synthetic_then_reuses_it(tmp_path, capsys):
  args = ['synthetic', '--data_dir', str(tmp_path), '--num_train', '5', '--num_val', '2']
  assert run_prepare([*args, '--image_size', '21']) == 0
  out = capsys.readouterr().out
  assert "{'train': 5, 'validation': 2}" in out and 'Done in' in out
  assert run_prepare([*args, '--image_size', '21']) == 0
  assert 'Already prepared' in capsys.readouterr().out


def test_prepares_ade20k_from_a_manual_dir(tmp_path, capsys):
  datagen.write_ade20k(tmp_path / 'manual', (3, 2), as_zip=True)
  argv = ['ade20k', '--manual_dir', str(tmp_path / 'manual'), '--data_dir', str(tmp_path / 'd')]
  assert run_prepare(argv) == 0
  out = capsys.readouterr().out
  assert 'found 3 train, 2 validation image/label pairs' in out
  assert "{'train': 3, 'validation': 2}" in out


def test_missing_files_are_named(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  argv = ['cityscapes', '--manual_dir', str(tmp_path / 'empty'), '--data_dir', str(tmp_path)]
  assert run_prepare(argv) == 1
  err = capsys.readouterr().err
  assert 'leftImg8bit_trainvaltest.zip' in err and 'gtFine/{train,val}/<city>' in err
  assert run_prepare(['voc2012', '--data_dir', str(tmp_path)]) == 1
  assert 'voc2012 needs --manual_dir DIR, where DIR holds' in capsys.readouterr().err


def test_bad_file_is_named_and_can_be_skipped(tmp_path, capsys):
  datagen.write_cityscapes(tmp_path / 'manual', (3, 2))
  label = next((tmp_path / 'manual' / 'gtFine' / 'val').rglob('*_labelIds.png'))
  shape = np.asarray(Image.open(label)).shape
  datagen.save(label, np.full(shape, 40, np.uint8))  # 40 is no label id.
  argv = ['cityscapes', '--manual_dir', str(tmp_path / 'manual'), '--data_dir', str(tmp_path)]
  assert run_prepare(argv) == 1
  err = capsys.readouterr().err
  assert f'{label}: unexpected label values [40]; expected values in 0..33' in err
  assert '--skip_bad_examples' in err
  assert run_prepare([*argv, '--skip_bad_examples']) == 0
  assert "{'train': 3, 'validation': 1}" in capsys.readouterr().out


@pytest.mark.e2e
def test_module_runs_without_tensorflow_noise(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_')}
  result = subprocess.run(
    [sys.executable, '-m', 'psp_jax.data.prepare', 'synthetic', '--data_dir', str(tmp_path)]
    + ['--num_train', '3', '--num_val', '1', '--image_size', '17'],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert "{'train': 3, 'validation': 1}" in result.stdout
  for noise in ('oneDNN custom operations', 'absl::InitializeLog', 'cuda'):
    assert noise not in result.stderr
