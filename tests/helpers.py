"""What several test modules share: the repository root, small configs and random weights,
train.py's command line in tests, the checks of a refused command, and NumPy restatements of
the official code (semseg's intersectionAndUnion and tool/test.py) that more than one module
compares against. Test modules import from here, never from each other (tests/test_layout.py).
"""

import importlib
import logging
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import nbformat
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from psp_jax import config_schema
from psp_jax.inference.planning import MEAN, STD, scaled_size

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'colab' / 'quickstart.ipynb'
SHRINK = dict(depth=18, width=4, head_channels=8, aux_channels=8, dtype='float32')
# tiny_config's classes, crop and batch; the in-memory pipeline source's examples and crop.
NUM_CLASSES, CROP, BATCH = 5, 41, 8
PIPELINE_EXAMPLES, PIPELINE_CROP = 10, 33


def load_config(name: str) -> ml_collections.ConfigDict:
  """configs/NAME.py's get_config() (configs/ imports itself as a package from the root)."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  return importlib.import_module(f'configs.{name}').get_config()


def tiny_config(**optim_overrides) -> ml_collections.ConfigDict:
  """configs/default.py shrunk to a PSPNet that compiles and runs in seconds on a CPU."""
  config = load_config('default')
  config.model.update(depth=18, width=4, head_channels=8, aux_channels=8, dtype='float32')
  config.data.num_classes = NUM_CLASSES
  config.data.crop_size = CROP
  config.batch_size = BATCH
  config.num_train_steps = 6
  config.optim.update(optim_overrides)
  return config


def random_variables(model, seed=0):
  """Random weights and BN statistics of `model`, from shapes alone (model.init compiles
  ~200 small programs on CPU: about a minute)."""
  shapes = jax.eval_shape(
    lambda k: model.init({'params': k}, jnp.zeros((1, 33, 33, 3)), train=False),
    jax.random.key(0),
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':  # He initialisation keeps activations O(1) through the ResNet.
      std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, std, leaf.shape), leaf.dtype)
    if name in ('scale', 'var'):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, shapes)


def refused(proc: subprocess.CompletedProcess, status: int, *words: str) -> str:
  """Asserts one short message on stderr, no traceback; returns it."""
  err = proc.stderr.strip()
  assert proc.returncode == status, (proc.returncode, err[-3000:])
  assert 'Traceback' not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, err[-3000:]
  for word in words:
    assert word in lines[0], (word, lines[0])
  return lines[0]


def user_env(**faults: str) -> dict[str, str]:
  """The environment as a user runs train.py (no XLA_FLAGS), plus tests/faults.py's."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS' and not k.startswith('FAULT_')}
  return env | faults


def command(shared, workdir, *extra: str, script: str = 'train.py', **overrides) -> list[str]:
  """The command line of train.py (or tests/faults.py) on configs/synthetic.py shrunk to a
  tiny model, 6 steps of 4 images; keyword arguments override config keys (a__b: a.b)."""
  config = {f'model.{k}': v for k, v in SHRINK.items()}
  config.update(
    {
      'data.data_dir': shared['data_dir'],
      'data.synthetic.num_train': 32,
      'data.synthetic.num_val': 8,
      'data.crop_size': 41,
      'data.shuffle_buffer': 32,
      'batch_size': 4,
      'num_train_steps': 6,
      'log_every_steps': 1,
      'eval_every_steps': 3,
      'checkpoint_every_steps': 3,
      'eval.batch_size': 8,
    }
  )
  config.update({k.replace('__', '.'): v for k, v in overrides.items()})
  path = ROOT / 'tests' / 'faults.py' if script == 'faults.py' else ROOT / script
  args = [sys.executable, str(path), f'--config={ROOT / "configs/synthetic.py"}']
  args += [f'--workdir={workdir}', f'--compilation_cache_dir={shared["cache"]}', *extra]
  return args + [f'--config.{k}={v}' for k, v in config.items()]


def train(
  shared, workdir, *extra: str, env=None, cwd=None, **overrides
) -> subprocess.CompletedProcess:
  """Runs command(...) to the end (in workdir's parent unless cwd is given)."""
  return subprocess.run(
    command(shared, workdir, *extra, **overrides),
    env=env or user_env(),
    cwd=str(cwd or workdir.parent),
    capture_output=True,
    text=True,
    timeout=1200,
  )


def check(proc: subprocess.CompletedProcess) -> str:
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  return log


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def restored(step_dir, keys=('params', 'batch_stats')) -> dict[str, np.ndarray]:
  """{path: array} of parts of a checkpoint's state, read without a target, as numpy (so a
  checkpoint of other devices or processes reads here too)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(step_dir / 'state').tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    args = ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy)
    state = handler.restore(step_dir / 'state', args=args)
  finally:
    handler.close()
  flat = {}

  def walk(tree, prefix):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
      if isinstance(value, dict | list | tuple):
        walk(value, f'{prefix}/{key}')
      elif value is not None:
        flat[f'{prefix}/{key}'] = np.asarray(value)

  walk({k: state[k] for k in keys}, '')
  return flat


def snapshot(workdir) -> dict[str, bytes]:
  """{relative path: contents} of every file of a workdir."""
  return {
    str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob('*')) if p.is_file()
  }


def steps(workdir) -> list[str]:
  return sorted(os.listdir(workdir / 'checkpoints'), key=lambda n: (len(n), n))


def assert_same_tree(got, expected) -> None:
  """Two pytrees of the same structure and bit for bit the same arrays."""
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def warnings_of(caplog) -> list[str]:
  """The messages of the warnings (and worse) caplog holds."""
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def checkpointed_workdir(path, make_state, model_config) -> pathlib.Path:
  """A run's workdir at path with checkpoints/1 and checkpoints/2 of make_state, and best/2."""
  from psp_jax.train import checkpointing  # noqa: PLC0415 (only the checkpoint tests)

  ckpts = checkpointing.Checkpoints(str(path), keep=3, async_save=False)
  for step in (1, 2):
    ckpts.save(make_state(step), model_config)
  ckpts.save_if_best(make_state(2), model_config, {'mIoU': 0.5})
  ckpts.close()
  return path


def assert_same_state(got_dir, expected_dir) -> None:
  keys = ('step', 'params', 'batch_stats', 'opt_state')
  got, expected = restored(got_dir, keys), restored(expected_dir, keys)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def intersection_and_union(output, target, k, ignore_index=255):
  """util.intersectionAndUnion of hszhao/semseg, restated (histograms of the kept pixels)."""
  output, target = output.reshape(-1).copy(), target.reshape(-1)
  output[target == ignore_index] = ignore_index
  intersection = output[output == target]
  area_i = np.histogram(intersection, bins=k, range=(0, k - 1))[0]
  area_o = np.histogram(output, bins=k, range=(0, k - 1))[0]
  area_t = np.histogram(target, bins=k, range=(0, k - 1))[0]
  return area_i, area_o + area_t - area_i, area_t


def dense_resize_matrix(in_size, out_size):
  """[out, in] bilinear matrix, written from the cv2 / torch align_corners=False formula."""
  m = np.zeros((out_size, in_size))
  for d in range(out_size):
    src = max((d + 0.5) * in_size / out_size - 0.5, 0.0)
    lo = min(int(math.floor(src)), in_size - 1)
    hi = min(lo + 1, in_size - 1)
    m[d, lo] += 1 - (src - lo) if lo < in_size - 1 else 1.0
    if lo < in_size - 1:
      m[d, hi] += src - lo
  return m


def semseg_test_reference(
  apply_fn, variables, image, crop, base_size, scales, *, classes, flip=True
):
  """tool/test.py test() for one image: float64 accumulation, dense resize matrices."""

  def resize(x, h, w):
    x = np.einsum('wv,hvc->hwc', dense_resize_matrix(x.shape[1], w), x)
    return np.einsum('hu,uwc->hwc', dense_resize_matrix(x.shape[0], h), x)

  def net_process(window):
    x = ((window - MEAN) / STD)[None].astype(np.float32)
    probs = np.asarray(jax.nn.softmax(apply_fn(variables, x), -1))[0]
    if flip:
      flipped = np.asarray(jax.nn.softmax(apply_fn(variables, x[:, :, ::-1]), -1))[0]
      probs = (probs + flipped[:, ::-1]) / 2
    return probs

  h, w = image.shape[:2]
  total = 0.0
  for scale in scales:
    new_h, new_w = scaled_size(h, w, scale, base_size)
    scaled = resize(image.astype(np.float64), new_h, new_w)
    pad_h, pad_w = max(crop[0] - new_h, 0), max(crop[1] - new_w, 0)
    padded = np.tile(MEAN.astype(np.float64), (new_h + pad_h, new_w + pad_w, 1))
    padded[pad_h // 2 : pad_h // 2 + new_h, pad_w // 2 : pad_w // 2 + new_w] = scaled
    ph, pw = padded.shape[:2]
    sh, sw = math.ceil(crop[0] * 2 / 3), math.ceil(crop[1] * 2 / 3)
    acc = np.zeros((ph, pw, classes))
    count = np.zeros((ph, pw, 1))
    for gy in range(math.ceil((ph - crop[0]) / sh) + 1):
      for gx in range(math.ceil((pw - crop[1]) / sw) + 1):
        e_h, e_w = min(gy * sh + crop[0], ph), min(gx * sw + crop[1], pw)
        s_h, s_w = e_h - crop[0], e_w - crop[1]
        acc[s_h:e_h, s_w:e_w] += net_process(padded[s_h:e_h, s_w:e_w])
        count[s_h:e_h, s_w:e_w] += 1
    acc = (acc / count)[pad_h // 2 : pad_h // 2 + new_h, pad_w // 2 : pad_w // 2 + new_w]
    total = total + resize(acc, h, w)
  return total / len(scales)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The schema's config.data (the official recipe) with a small crop and shuffle buffer."""
  config = config_schema.get_config().data
  config.update(dict(crop_size=PIPELINE_CROP, shuffle_buffer=4, deterministic=True))
  config.update(overrides)
  return config


def make_example(i):
  """Example i: a flat image of value 10 * i + 5 and label (i mod 7), of varying size."""
  i = tf.cast(i, tf.int32)
  h, w = 36 + 5 * (i % 3), 40 + 7 * (i % 4)
  image = tf.fill(tf.stack([h, w, 3]), tf.cast(10 * i + 5, tf.uint8))
  label = tf.fill(tf.stack([h, w]), tf.cast(i % 7, tf.uint8))
  return {'image': image, 'label': label}


def source(num=PIPELINE_EXAMPLES, process_index=0, process_count=1):
  return tf.data.Dataset.range(num).shard(process_count, process_index).map(make_example)


def take(dataset, n):
  return list(dataset.take(n).as_numpy_iterator())


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def read_notebook() -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(nb: nbformat.NotebookNode) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'expected one cell tagged "parameters", found {len(tagged)}'
  return tagged[0]
