"""The serving function and its three writers: StableHLO, TF SavedModel and ONNX files.

uint8 RGB images [B, H, W, 3] in, normalised inside; labels int32 [B, H, W] (or float32
logits or probabilities [B, H, W, K]) out; the weights inside the artifact.
Design: docs/serving.md#formats
"""

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from psp_jax import errors, runtime, weights
from psp_jax.data.normalization import MEAN_RGB, STD_RGB
from psp_jax.serving import contract, onnx_graph, runner

ApplyFn = Callable[[Any, jax.Array], jax.Array]


class ConversionError(errors.UserError):
  """A converter that cannot turn our program into its format (the reason is in the message)."""


def serving_function(apply_fn: ApplyFn, outputs: str) -> Callable[[Any, jax.Array], jax.Array]:
  """f(variables, uint8 images [B, H, W, 3]) -> labels int32 [B, H, W], or float32 scores.

  Args:
    apply_fn: apply_fn(variables, normalised float32 images) -> logits [B, H, W, K].
    outputs: 'labels' (argmax, the first maximum on ties), 'logits' or 'probs' (softmax).
  """
  mean, std = np.asarray(MEAN_RGB, np.float32), np.asarray(STD_RGB, np.float32)

  def serve(variables: Any, images: jax.Array) -> jax.Array:
    logits = apply_fn(variables, (images.astype(jnp.float32) - mean) / std)
    logits = logits.astype(jnp.float32)
    if outputs == 'labels':
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if outputs == 'probs':
      return jax.nn.softmax(logits, axis=-1)
    return logits

  return serve


def input_shape(batch: int | None, size: Sequence[int]) -> tuple[Any, ...]:
  """(B, H, W, 3) with B None for a dynamic batch."""
  return (batch, int(size[0]), int(size[1]), 3)


def write_stablehlo(
  fn: Callable[[jax.Array], jax.Array],
  shape: tuple[Any, ...],
  platforms: Sequence[str],
  directory: str,
) -> dict[str, Any]:
  """DIR/model.stablehlo (jax.export, batch symbolic if None) and DIR/run_stablehlo.py.

  Returns:
    serving.json entries of this format (the calling convention version).
  """
  batch = jax.export.symbolic_shape('B')[0] if shape[0] is None else shape[0]
  spec = jax.ShapeDtypeStruct((batch, *shape[1:]), jnp.uint8)
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
  with open(os.path.join(directory, runner.STABLEHLO_FILE), 'wb') as f:
    f.write(exported.serialize())
  shutil.copyfile(runner.__file__, os.path.join(directory, 'run_stablehlo.py'))
  return {'stablehlo': {'calling_convention_version': exported.calling_convention_version}}


def write_savedmodel(
  serve: Callable[[Any, jax.Array], jax.Array],
  variables: Mapping[str, Any],
  shape: tuple[Any, ...],
  platforms: Sequence[str],
  outputs: str,
  directory: str,
) -> dict[str, Any]:
  """A TF SavedModel in DIR: signature serving_default, images uint8 -> {outputs: ...}."""
  runtime.setup_tensorflow()  # Quiet, and off the accelerators: JAX owns them.
  import tensorflow as tf  # noqa: PLC0415 (optional: the `export` extra)
  from jax.experimental import jax2tf  # noqa: PLC0415 (imports TensorFlow)

  height, width = shape[1:3]
  polymorphic = None if shape[0] is not None else [None, f'(b, {height}, {width}, 3)']
  tf_serve = jax2tf.convert(
    serve,
    polymorphic_shapes=polymorphic,
    with_gradient=False,
    native_serialization_platforms=tuple(platforms),
  )
  module = tf.Module()
  module.weights = tf.nest.map_structure(
    lambda a: tf.Variable(a, trainable=False), jax.tree.map(np.asarray, dict(variables))
  )
  signature = tf.TensorSpec(list(shape), tf.uint8, name=contract.INPUT_NAME)

  @tf.function(input_signature=[signature], autograph=False)
  def serving_default(images):
    return {outputs: tf_serve(module.weights, images)}

  module.serving_default = serving_default
  tf.saved_model.save(module, directory, signatures={'serving_default': serving_default})
  return {'savedmodel': {'signature': 'serving_default', 'output_key': outputs}}


def write_onnx(
  fn: Callable[[jax.Array], jax.Array], shape: tuple[Any, ...], outputs: str, directory: str
) -> dict[str, Any]:
  """DIR/model.onnx (opset onnx_graph.OPSET, batch 'B' if None), checked by onnx.checker.

  Raises:
    ConversionError: jax2onnx cannot convert the program, or the file is not valid ONNX.
  """
  import onnx  # noqa: PLC0415 (optional: the `export` extra)

  onnx_shape = ['B' if d is None else d for d in shape]
  try:
    model = onnx_graph.to_onnx(
      fn, onnx_shape, jnp.uint8, output_name=outputs, input_name=contract.INPUT_NAME
    )
    onnx.checker.check_model(model)
  except Exception as e:  # jax2onnx raises what its lowerings raise: any type.
    raise ConversionError(
      f'ONNX export failed: jax2onnx could not convert the PSPNet program ({weights.reason(e)}). '
      'The stablehlo and savedmodel formats do not depend on it.'
    ) from e
  path = os.path.join(directory, 'model.onnx')
  onnx.save_model(model, path)
  return {'onnx': {'opset': onnx_graph.OPSET, 'input': contract.INPUT_NAME, 'output': outputs}}
