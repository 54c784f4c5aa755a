"""Checkpoint -> artifact folder: load once, write a format, check it, then put it in place.

  exporter = Exporter.from_checkpoint('runs/ade20k')
  exporter.export('onnx', 'exported/onnx', size=(512, 512), batch=None, outputs='logits')

A failed check leaves the output folder as it was. Design: docs/serving.md#the-parity-check
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from psp_jax import digests, errors, paths
from psp_jax.inference import planning, segmenter
from psp_jax.serving import artifact, contract, deps, formats, parity

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
NUMBER_LIST = re.compile(r'\[\s*((?:-?[\d.eE+-]+,\s*)*-?[\d.eE+-]+)\s*\]')
PARITY_IMAGES_DYNAMIC = 2  # Images of the parity check of a dynamic-batch artifact.


def check_request(fmt: str, outputs: str, platforms: Sequence[str]) -> None:
  """Refuses an unknown format, output or platform before any work (errors.UsageError)."""
  if fmt not in contract.FORMATS:
    raise errors.UsageError(f'--format {fmt!r}: expected one of {", ".join(contract.FORMATS)}.')
  if outputs not in contract.OUTPUTS:
    raise errors.UsageError(
      f'--outputs {outputs!r}: expected one of {", ".join(contract.OUTPUTS)}.'
    )
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or 'cpu' not in platforms:
    raise errors.UsageError(
      f'--platforms {",".join(platforms)}: expected some of {", ".join(PLATFORMS)}, cpu among '
      'them (the parity check runs the artifact on the CPU).'
    )


def check_output(output: str | os.PathLike, fmt: str, overwrite: bool) -> None:
  """Refuses a remote output or one that holds what this export would write."""
  if paths.is_remote(output):
    raise errors.InvalidInputError(
      f'--output {output}: export writes a local folder; copy it to {output} afterwards.'
    )
  files = (*contract.FILES[fmt], contract.METADATA_FILE)
  paths.check_output_dir(output, flag='--output', files=files, overwrite=overwrite)


class Exporter:
  """A PSPNet and its data set, ready to be exported in any format and checked.

  Attributes:
    model_config: the checkpoint's PSPNet arguments (dtype float32).
    dataset, class_names, palette: as predict shows them.
  """

  def __init__(
    self,
    apply_fn: formats.ApplyFn,
    variables: Mapping[str, Any],
    model_config: Mapping[str, Any],
    *,
    checkpoint: str = '',
    dataset: str | None = None,
    dataset_meta: Mapping[str, Any] | None = None,
  ):
    self.apply_fn = apply_fn
    self.variables = jax.tree.map(np.asarray, dict(variables))
    self.model_config = dict(model_config)
    self.checkpoint = str(checkpoint)
    # As Segmenter.from_checkpoint chooses them: predict shows the same.
    config = segmenter.run_config(checkpoint) if checkpoint and dataset is None else None
    self.dataset, self.class_names, self.palette = segmenter.dataset_of(
      int(model_config['num_classes']), dataset, config=config, meta=dataset_meta
    )
    self._references: dict[tuple[Any, ...], np.ndarray] = {}

  @classmethod
  def from_checkpoint(cls, checkpoint: str | os.PathLike, dataset: str | None = None):
    """A training workdir, converted weights directory or .pth (inference.segmenter.load)."""
    # float32 whatever the checkpoint trained in: the parity bounds are float32 bounds, and
    # onnxruntime's CPU convolutions take no bfloat16.
    loaded = segmenter.load(checkpoint, dtype='float32')
    return cls(
      loaded.apply_fn,
      loaded.variables,
      loaded.model_config,
      checkpoint=str(checkpoint),
      dataset=dataset,
      dataset_meta=loaded.dataset_meta,
    )

  def reference(self, images: np.ndarray) -> np.ndarray:
    """float32 logits [N, H, W, K] of the in-process model (on the CPU), cached per batch."""
    images = np.ascontiguousarray(images)
    key = (images.shape, hashlib.sha256(images.tobytes()).hexdigest())
    if key not in self._references:
      normalised = (images.astype(np.float32) - planning.MEAN) / planning.STD
      with jax.default_device(jax.devices('cpu')[0]):
        logits = jax.jit(self.apply_fn)(self.variables, normalised)
      self._references[key] = np.asarray(logits, np.float32)
    return self._references[key]

  def export(
    self,
    fmt: str,
    output: str | os.PathLike,
    *,
    size: Sequence[int],
    batch: int | None = 1,
    outputs: str = 'labels',
    platforms: Sequence[str] = ('cpu',),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
  ) -> dict[str, Any]:
    """Writes, checks and puts in place one artifact; returns its serving.json.

    Args:
      fmt: 'stablehlo', 'savedmodel' or 'onnx'.
      output: the artifact folder (created; files of an earlier export need overwrite).
      size: the input (H, W).
      batch: the batch size, or None for any.
      outputs: 'labels', 'logits' or 'probs'.
      platforms: what StableHLO / SavedModel are lowered for (cpu among them).
      log: receives one line per stage.

    Raises:
      errors.UsageError: an unknown format, output or platform.
      errors.InvalidInputError: a size the model cannot take.
      paths.OutputPathError: output holds a previous export and overwrite is False.
      deps.MissingDependencyError: the format's packages are not installed.
      deps.IncompatibleRuntimeError: TensorFlow cannot run the SavedModel this jax wrote.
      formats.ConversionError: the converter cannot convert the program.
      parity.ParityError: the artifact's output is not the in-process model's.
    """
    platforms = tuple(platforms)
    check_request(fmt, outputs, platforms)
    deps.require(fmt)
    contract.check_size(size, self.model_config)
    check_output(output, fmt, overwrite)
    output = os.path.abspath(os.fspath(output))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.', dir=os.path.dirname(output))
    try:
      meta = contract.metadata(
        fmt=fmt,
        size=size,
        batch=batch,
        outputs=outputs,
        model_config=self.model_config,
        dataset=self.dataset,
        class_names=self.class_names,
        palette=self.palette,
        checkpoint=self.checkpoint,
        platforms=platforms if fmt != 'onnx' else (),
      )
      log(f'exporting {fmt} ({outputs}, {size[0]}x{size[1]}, batch {meta["input"]["batch"]})')
      meta.update(self._write(fmt, staging, size, batch, outputs, platforms))
      files = digests.of_files(staging, contract.FILES[fmt])
      meta['digests'] = {'algorithm': digests.ALGORITHM, 'files': files}
      write_json(staging, meta)
      try:
        report = self.check(staging, size, batch, outputs)
      except deps.IncompatibleRuntimeError as e:  # Named for the export, not its staging.
        after = f' Nothing was written to {output}.'
        raise deps.stablehlo_too_new(
          str(e.__cause__), f'--format {fmt}', jax.__version__, after
        ) from e
      log(f'parity against the in-process model: {report.summary()}')
      if not report.passed:
        raise parity.ParityError(
          f'the {fmt} artifact does not give the in-process answer: {report.summary()}. '
          f'Nothing was written to {output}.'
        )
      meta['parity'] = report.as_json()
      write_json(staging, meta)
      move_into(staging, output, (*contract.FILES[fmt], contract.METADATA_FILE))
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    log(f'wrote {output} ({folder_size(output, fmt) / 1e6:.1f} MB)')
    return meta

  def _write(self, fmt, directory, size, batch, outputs, platforms) -> dict[str, Any]:
    serve = formats.serving_function(self.apply_fn, outputs)
    shape = formats.input_shape(batch, size)
    variables = self.variables

    def closed(images):  # The weights become constants of the program.
      return serve(variables, images)

    if fmt == 'stablehlo':
      return formats.write_stablehlo(closed, shape, platforms, directory)
    if fmt == 'savedmodel':
      return formats.write_savedmodel(serve, variables, shape, platforms, outputs, directory)
    return formats.write_onnx(closed, shape, outputs, directory)

  def check(self, directory: str, size: Sequence[int], batch: int | None, outputs: str):
    """ParityReport of the artifact in directory on parity.images (batch or 2 of them)."""
    images = parity.images(batch or PARITY_IMAGES_DYNAMIC, tuple(size))
    with jax.default_device(jax.devices('cpu')[0]):
      opened = artifact.open_artifact(directory)
      got = opened.run(images)
    return parity.compare(outputs, got, self.reference(images))


def write_json(directory: str, meta: Mapping[str, Any]) -> None:
  """DIR/serving.json, indented, with lists of numbers (palette rows, shapes) on one line."""
  text = json.dumps(meta, indent=2)
  text = NUMBER_LIST.sub(lambda m: '[' + re.sub(r',\s+', ', ', m.group(1)) + ']', text)
  with open(os.path.join(directory, contract.METADATA_FILE), 'w') as f:
    f.write(text + '\n')


def move_into(staging: str, output: str, names: Sequence[str]) -> None:
  """Moves names from staging into output, replacing what is there (overwrite was checked)."""
  os.makedirs(output, exist_ok=True)
  for name in names:
    source, target = os.path.join(staging, name), os.path.join(output, name)
    if not os.path.exists(source):
      continue
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
    os.replace(source, target)


def folder_size(output: str, fmt: str) -> int:
  """Bytes of the model files of an artifact (serving.json and the runner copy aside)."""
  total = 0
  for name in contract.FILES[fmt]:
    path = os.path.join(output, name)
    if os.path.isdir(path):
      total += sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
      )
    elif os.path.isfile(path) and name != 'run_stablehlo.py':
      total += os.path.getsize(path)
  return total
