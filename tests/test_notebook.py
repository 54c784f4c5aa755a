"""Runs colab/quickstart.ipynb top to bottom in a Jupyter kernel, shrunk to a few steps, as CI.

The parameters are overridden papermill-style: a cell inserted after the one tagged
`parameters`. Every command the notebook runs goes through its `run` helper, which raises on
a non-zero exit, so any failing cell or command fails the test.
"""

import importlib.util
import json
import os
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from PIL import Image

from psp_jax import distributed

from helpers import NOTEBOOK, ROOT, parameters_index, read_notebook

HAVE_TORCH = importlib.util.find_spec('torch') is not None
TORCH_CONFIG = dict(num_classes=150, depth=18, width=4, head_channels=8, aux_channels=8)
# configs/synthetic.py shrunk to seconds: a width-4 PSPNet-18, 16 training images of 65 pixels.
SMALL = {
  'model.width': 4,
  'model.head_channels': 8,
  'model.aux_channels': 8,
  'data.synthetic.num_train': 16,
  'data.synthetic.num_val': 4,
  'data.synthetic.image_size': 65,
  'data.crop_size': 41,
  'data.shuffle_buffer': 16,
  'log_every_steps': 1,
  'eval_every_steps': 2,
  'checkpoint_every_steps': 2,
  'eval.base_size': 65,
}


def parameter_names(nb: nbformat.NotebookNode) -> set[str]:
  source = nb.cells[parameters_index(nb)].source
  return {line.split('=')[0].strip() for line in source.splitlines() if ' = ' in line}


def inject(nb: nbformat.NotebookNode, params: dict) -> nbformat.NotebookNode:
  """A copy with a cell setting `params` right after the parameters cell."""
  unknown = set(params) - parameter_names(nb)
  assert not unknown, f'not parameters of the notebook: {sorted(unknown)}'
  nb = nbformat.from_dict(json.loads(json.dumps(nb)))
  source = '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  cell = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
  nb.cells.insert(parameters_index(nb) + 1, cell)
  return nb


def test_committed_notebook_has_no_outputs():
  nb = read_notebook()
  nbformat.validate(nb)
  dirty = [
    i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and (c.outputs or c.execution_count)
  ]
  assert not dirty, (
    f'cells {dirty} of {NOTEBOOK} have outputs: clear them before committing '
    '(Colab: Edit > Clear all outputs; or python tests/test_notebook.py --strip).'
  )


def test_notebook_defaults_install_and_use_a_tpu():
  """As committed, the notebook installs itself and asks Colab for the v5e-1 TPU."""
  nb = read_notebook()
  namespace: dict = {}
  exec(nb.cells[parameters_index(nb)].source, namespace)
  assert namespace['INSTALL'] is True
  assert namespace['REPO_URL'].startswith('https://') and namespace['REPO_URL'].endswith('.git')
  assert namespace['TORCH_CHECKPOINT'] == '' and namespace['OVERRIDES'] == {}
  assert nb.metadata['accelerator'] == 'TPU' and nb.metadata['colab']['gpuType'] == 'V5E1'
  assert nb.metadata['kernelspec']['name'] == 'python3'


def test_inject_rejects_unknown_parameters():
  with pytest.raises(AssertionError, match='NOT_A_PARAMETER'):
    inject(read_notebook(), {'NOT_A_PARAMETER': 1})


def official_checkpoint(path: pathlib.Path) -> pathlib.Path:
  """A tiny PSPNet-18 with 150 classes saved as the official train.py saves its checkpoints."""
  import torch  # noqa: PLC0415 (optional: only when torch is installed)

  from psp_jax.interop import torch_pspnet  # noqa: PLC0415 (needs torch, which is optional here)

  torch.manual_seed(0)
  net = torch_pspnet.build(TORCH_CONFIG)
  state = {f'module.{k}': v for k, v in net.state_dict().items()}
  torch.save({'epoch': 100, 'state_dict': state}, path)
  return path


def outputs_of(nb: nbformat.NotebookNode) -> tuple[str, int]:
  """(all printed text, number of displayed PNG images)."""
  text, images = [], 0
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.output_type == 'stream':
        text.append(out.text)
      elif out.output_type in ('display_data', 'execute_result'):
        images += 'image/png' in out.data
        text.append(out.data.get('text/plain', ''))
  return ''.join(text), images


@pytest.mark.e2e
def test_quickstart_runs_top_to_bottom(tmp_path):
  """The whole notebook on 2 CPU devices, with a converted PyTorch checkpoint if torch is here.

  Without torch (the Python 3.12 leg of CI) the conversion and the benchmark are switched
  off by their parameters; everything else runs the same.
  """
  workdir = tmp_path / 'run'
  picture = tmp_path / 'street.png'
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(picture)
  params = dict(
    INSTALL=False,
    REPO_DIR=str(ROOT),
    DATA_DIR=str(tmp_path / 'tfds'),
    WORKDIR=str(workdir),
    TRAIN_STEPS=4,
    BATCH_SIZE=3,
    OVERRIDES=SMALL,
    NUM_EXAMPLES=2,
    TORCH_CHECKPOINT=str(official_checkpoint(tmp_path / 'train_epoch_100.pth'))
    if HAVE_TORCH
    else '',
    PICTURE=str(picture),
    RUN_BENCHMARK=HAVE_TORCH,
  )
  nb = inject(read_notebook(), params)
  # Two simulated devices: the batch of 3 must become 4, and every command must shard.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla'))
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count=2 {distributed.CPU_XLA_FLAGS}'
  client = NotebookClient(
    nb, timeout=1200, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  )
  try:
    client.execute(env=env)
  finally:
    nbformat.write(nb, tmp_path / 'executed.ipynb')  # For a look at a failure.
  text, images = outputs_of(nb)

  assert 'backend CPU: 2 x cpu' in text, text[:3000]
  assert 'Global batch 4 (2 per device).' in text
  # Trained 4 steps, validated at steps 2 and 4, wrote checkpoints, evaluated.
  assert 'step 4: val mIoU' in text, text[-5000:]
  assert (workdir / 'checkpoints' / '4').is_dir()
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert results['setup']['images'] == 4 and 0 <= results['mIoU'] <= 1
  assert f'Validation: mIoU {results["mIoU"]:.3f}' in text
  # The examples: predictions of the 65-pixel validation images, shown in one panel.
  predicted = np.asarray(Image.open(workdir / 'examples' / 'predicted' / 'val_001.png'))
  assert predicted.shape == (65, 65) and predicted.max() < 11
  assert 'input | ground truth | prediction' in text
  if HAVE_TORCH:
    assert (workdir / 'converted' / 'model_config.json').is_file()
    config = json.loads((workdir / 'converted' / 'model_config.json').read_text())
    assert {k: config[k] for k in TORCH_CONFIG} == TORCH_CONFIG
    overlay = Image.open(workdir / 'picture' / 'street_overlay.png')
    assert overlay.height >= 60 and overlay.width > 80
    assert images == 2
    assert 'benchmarks/vs_pytorch.py --quick' in text
    # The quick table goes to the run's folder: benchmarks/results keeps the measured one.
    assert (workdir / 'benchmark' / 'vs_pytorch.md').read_text().count('| eval') >= 1
  else:
    assert 'No PyTorch checkpoint given' in text and 'Skipped (RUN_BENCHMARK = False)' in text
    assert images == 1


@pytest.mark.e2e
def test_a_failing_command_fails_the_notebook(tmp_path):
  """The notebook's `run` helper raises on a non-zero exit, so CI sees a failing command."""
  params = dict(INSTALL=False, REPO_DIR=str(ROOT), WORKDIR=str(tmp_path / 'run'))
  nb = inject(read_notebook(), {**params, 'OVERRIDES': {'optim.base_lr': -1.0}})
  # train.py rejects the config before building anything; stop after its cell.
  train = next(i for i, c in enumerate(nb.cells) if "'train.py'" in c.source)
  nb.cells = nb.cells[: train + 1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  client = NotebookClient(
    nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  )
  with pytest.raises(CellExecutionError, match='exit code'):
    client.execute(env=env)


@pytest.mark.e2e
@pytest.mark.network
def test_the_colab_install_cell_resolves(tmp_path):
  """INSTALL = True as in Colab, from a clone of this repository, with pip --dry-run: the
  clone, the requirements read from its pyproject.toml and pip's resolution all work.

  The benchmark is off, so that no PyTorch is fetched where it is missing (its index,
  download.pytorch.org, is out of reach of CI).
  """
  params = dict(REPO_URL=str(ROOT), REPO_DIR=str(tmp_path / 'clone'), PIP_OPTIONS=['--dry-run'])
  nb = inject(read_notebook(), {**params, 'RUN_BENCHMARK': False})
  install = next(i for i, c in enumerate(nb.cells) if 'def pip_install' in c.source)
  nb.cells = nb.cells[: install + 1]
  client = NotebookClient(
    nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  )
  client.execute()
  text, _ = outputs_of(nb)
  assert (tmp_path / 'clone' / 'pyproject.toml').is_file()
  assert f'pip install --dry-run -e {tmp_path / "clone"}' in text, text[-3000:]
  # This machine has TensorFlow: the data extra comes without tensorflow-cpu.
  assert 'tensorflow-datasets' in text and 'tensorflow-cpu' not in text
  assert 'Would install psp-jax-' in text
  assert f'Working in {tmp_path / "clone"}' in text


if __name__ == '__main__':
  import sys

  if sys.argv[1:] != ['--strip']:
    sys.exit('usage: python tests/test_notebook.py --strip  (clears the outputs of the notebook)')
  book = read_notebook()
  for c in book.cells:
    if c.cell_type == 'code':
      c.update(outputs=[], execution_count=None)
  nbformat.write(book, NOTEBOOK)
