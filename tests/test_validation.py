"""One validation path: TensorBoard's val/mIoU is what `psp_jax.evaluate` prints in whole mode.

A short in-process run validates at its last step; evaluating the checkpoint it saved with
`--config.eval.mode=whole` must give the very same numbers, on the synthetic data (square,
129 px) and on a folder of non-square images whose sides are no multiple of anything.
"""

import jax
import numpy as np
import pytest

from psp_jax import experiment, weights
from psp_jax.inference import evaluation
from psp_jax.train import summaries

import datagen
from helpers import SHRINK, load_config


def tiny_config(tmp_path, data: str):
  config = load_config('synthetic')
  config.model.update(SHRINK)
  config.data.crop_size = 41
  config.batch_size = 8
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.eval.batch_size = 8
  config.eval.max_examples = 0
  if data == 'synthetic':
    config.data.data_dir = str(tmp_path / 'tfds')
    config.data.synthetic.num_train = 16
    config.data.synthetic.num_val = 10
  else:  # Sides 16..23 x 24..38 (datagen._shape): non-square, odd, no multiple of 8.
    for split, count in (('train', 8), ('val', 8)):
      datagen.write_folder(tmp_path / 'folder', split, count, num_classes=4, seed=len(split))
    config.data.name = 'folder'
    config.data.root = str(tmp_path / 'folder')
    config.data.num_classes = 4
    config.eval.base_size = 37  # Resized to a long side of 37, then padded to multiples of 8.
    config.eval.whole_multiple = 8
  config.eval.mode = 'slide'  # What the CLI would do unless told --config.eval.mode=whole.
  return config


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize('data', ['synthetic', 'folder'])
def test_in_training_validation_equals_evaluate_whole(tmp_path, data):
  config = tiny_config(tmp_path, data)
  workdir = tmp_path / 'run'
  result = experiment.train_and_evaluate(config, str(workdir))
  assert result['step'] == 2 and set(result['val']) == {'mIoU', 'mAcc', 'allAcc'}

  config.eval.mode = 'whole'
  printed = evaluation.evaluate(config, str(workdir), progress=False)
  for key in ('mIoU', 'mAcc', 'allAcc'):
    assert result['val'][key] == printed[key], key  # The same code: exactly equal.
  assert printed['setup']['mode'] == 'whole'
  # The checkpoint evaluated is the step validated (best and newest are both step 2).
  variables, _ = weights.load_variables(workdir)
  for a, b in zip(
    jax.tree.leaves(variables), jax.tree.leaves(result['state'].variables), strict=True
  ):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_example_panels_pad_rows_of_other_sizes():
  examples = [
    dict(
      image=np.full((5, 7, 3), 9, np.uint8), label=np.zeros((5, 7), int), pred=np.ones((5, 7), int)
    ),
    dict(
      image=np.full((3, 4, 3), 9, np.uint8), label=np.full((3, 4), 255), pred=np.ones((3, 4), int)
    ),
  ]
  palette = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
  panels = summaries.example_panels(examples, palette)
  assert panels.shape[0] == 2 and panels.dtype == np.uint8
  assert panels.shape[1] == 5
  assert (panels[1, 3:] == 0).all()  # The smaller row is padded black below.
  assert (panels[0, 0, 0] == 9).all()  # The input image comes first, as it is.
