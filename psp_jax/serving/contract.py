"""What an exported model promises: formats, outputs, sizes, and the serving.json that says so.

An artifact folder holds the model file(s) of one format and serving.json (`metadata`).
Design: docs/serving.md#the-contract
"""

import datetime
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any

import jax

import psp_jax
from psp_jax import errors
from psp_jax.data.normalization import MEAN_RGB, STD_RGB
from psp_jax.models import codec
from psp_jax.serving import runner

FORMATS = ('stablehlo', 'savedmodel', 'onnx')
OUTPUTS = ('labels', 'logits', 'probs')
METADATA_FILE = runner.METADATA_FILE
# The files each format writes in --output (serving.json besides): what --overwrite replaces.
FILES = {
  'stablehlo': (runner.STABLEHLO_FILE, 'run_stablehlo.py'),
  'savedmodel': ('saved_model.pb', 'variables', 'assets', 'fingerprint.pb'),
  'onnx': ('model.onnx',),
}
MODEL_FILE = {'stablehlo': runner.STABLEHLO_FILE, 'savedmodel': '.', 'onnx': 'model.onnx'}
INPUT_NAME = 'images'
# Distributions whose versions serving.json records, besides psp-jax, jax and jaxlib.
FORMAT_PACKAGES = {
  'stablehlo': ('flatbuffers',),
  'savedmodel': ('tensorflow-cpu', 'tensorflow'),
  'onnx': ('jax2onnx', 'onnx', 'onnxruntime'),
}
# Largest side accepted: a larger artifact is possible, but its parity check alone would need
# tens of GB on a CPU.
MAX_SIDE = 4096


def parse_size(text: str) -> tuple[int, int]:
  """(H, W) of '512x512' (or '512', a square).

  Raises:
    errors.UsageError: anything else.
  """
  parts = str(text).lower().replace(' ', '').split('x')
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or min(size) < 1:
    raise errors.UsageError(
      f'--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. --size 512x512.'
    )
  return size


def parse_batch(text: str | int) -> int | None:
  """A fixed batch size, or None for 'dynamic' (any batch).

  Raises:
    errors.UsageError: neither a positive int nor 'dynamic'.
  """
  if str(text).lower() == 'dynamic':
    return None
  try:
    batch = int(text)
  except ValueError:
    batch = 0
  if batch < 1:
    raise errors.UsageError(f"--batch {text!r}: expected a positive int or 'dynamic'.")
  return batch


def check_size(size: Sequence[int], model_config: Mapping[str, Any]) -> None:
  """Refuses an input size the model cannot take meaningfully (codec.min_input_side).

  Raises:
    errors.InvalidInputError: naming the size, the reason and the smallest that works.
  """
  smallest = codec.min_input_side(model_config)
  height, width = size
  if min(height, width) < smallest:
    model = {**codec.defaults(), **model_config}
    stride, largest = model['output_stride'], max(model['bins'])
    feature = f'{codec.feature_side(height, stride)}x{codec.feature_side(width, stride)}'
    raise errors.InvalidInputError(
      f'--size {height}x{width} is too small for this model: its layer4 feature map would be '
      f'{feature}, smaller than the largest pyramid bin ({largest}) at output stride {stride}; '
      f'use at least {smallest}x{smallest}.'
    )
  if max(height, width) > MAX_SIDE:
    raise errors.InvalidInputError(
      f'--size {height}x{width}: sides above {MAX_SIDE} are not supported (the parity check '
      'alone would need tens of GB); export a smaller size and let the caller resize.'
    )


def versions(fmt: str) -> dict[str, str]:
  """Versions of psp-jax, jax, jaxlib and the format's converter and runtime (those installed)."""
  out = {'psp_jax': psp_jax.__version__}
  for name in ('jax', 'jaxlib', *FORMAT_PACKAGES[fmt]):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return out


def metadata(
  *,
  fmt: str,
  size: Sequence[int],
  batch: int | None,
  outputs: str,
  model_config: Mapping[str, Any],
  dataset: str | None,
  class_names: Sequence[str],
  palette: Any,
  checkpoint: str,
  platforms: Sequence[str],
  extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """serving.json's content (the parity report is added once the check has run)."""
  height, width = (int(s) for s in size)
  batch_dim = 'dynamic' if batch is None else int(batch)
  num_classes = int(model_config['num_classes'])
  shape = ['B' if batch is None else batch_dim, height, width]
  output = {
    'kind': outputs,
    'shape': shape if outputs == 'labels' else [*shape, num_classes],
    'dtype': 'int32' if outputs == 'labels' else 'float32',
    'meaning': {
      'labels': 'class index per pixel (argmax of the logits, first maximum on ties)',
      'logits': 'class scores per pixel, before softmax',
      'probs': 'softmax of the logits over the class axis',
    }[outputs],
  }
  return {
    'format': fmt,
    'file': MODEL_FILE[fmt],
    'input': {
      'name': INPUT_NAME,
      'shape': [shape[0], height, width, 3],
      'dtype': 'uint8',
      'layout': 'NHWC',
      'channels': 'RGB',
      'size': [height, width],
      'batch': batch_dim,
    },
    'output': output,
    'preprocessing': {
      'inside_model': 'x = (float32(images) - mean) / std, per channel (RGB, 0..255 scale)',
      'mean': list(MEAN_RGB),
      'std': list(STD_RGB),
      'caller': (
        f'give images of exactly {height}x{width}: psp_jax.serving.runner scales each image '
        'to fit (aspect kept, bilinear), centres it on a canvas of pad_value, and crops and '
        'resizes the label map back'
      ),
      'pad_value': [round(v) for v in MEAN_RGB],
    },
    'dtype': 'float32',
    'num_classes': num_classes,
    'dataset': dataset,
    'class_names': list(class_names),
    'palette': [[int(c) for c in row] for row in palette],
    'model_config': dict(model_config),
    'platforms': list(platforms),
    'checkpoint': checkpoint,
    'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'versions': versions(fmt),
    'jax_backend': jax.default_backend(),
    **dict(extra or {}),
  }
