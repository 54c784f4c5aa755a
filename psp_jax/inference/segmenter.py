"""Label maps, colour masks and overlays for images: the `Segmenter` API.

`python -m psp_jax.predict` is its command line. In a notebook:

  seg = Segmenter.from_checkpoint('runs/ade20k')
  labels = seg.predict(image)           # int32 [H, W]
  plt.imshow(seg.colorize(labels))
"""

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from psp_jax import config_schema, errors, paths, visualize, weights
from psp_jax.data import classes, datasets
from psp_jax.data.files import IMAGE_EXTENSIONS
from psp_jax.inference.sliding_window import InferenceConfig, SlidingWindowInference
from psp_jax.models import codec


def is_mmseg_variant(model_config: dict[str, Any]) -> bool:
  """Whether a model config is mmseg's network (ResNetV1c stem or align_corners=False)."""
  settings = {**codec.defaults(), **model_config}  # A key it lacks means PSPNet's default.
  return settings['stem'] == 'deep_v1c' or settings['align_corners'] is False


def default_inference(
  dataset: str | None, model_config: dict[str, Any] | None = None, **overrides
) -> InferenceConfig:
  """The test procedure of a model that comes without an experiment config.

  The official one (tool/test.py's sliding window with flip, at the data set's base_size and
  crop) for the official network; mmseg's (datasets.MMSEG_TEST, fitting the data set's
  mmseg_scale; the crop, its mmseg_crop, for a --mode slide asked for on top) for mmseg's
  variant, whose published numbers it reproduces. Overrides (InferenceConfig fields) win one
  by one; base_size given without resize means the official long-side resize it belongs to.

  Args:
    dataset: 'ade20k', 'voc2012', 'cityscapes', other or None.
    model_config: the checkpoint's model config (codec); None counts as official.
    overrides: InferenceConfig fields the caller chose.
  """
  known = datasets.DATASETS.get(dataset)
  if model_config is not None and is_mmseg_variant(model_config):
    if known is None or known.mmseg_scale is None:
      known = datasets.DATASETS['ade20k']  # Data sets not in the table (or unknown) get ADE20K's.
    kwargs = {**datasets.MMSEG_TEST, 'fit_scale': known.mmseg_scale, 'crop_size': known.mmseg_crop}
    if 'base_size' in overrides and 'resize' not in overrides:
      kwargs['resize'] = 'long_side'
  elif known is not None and known.base_size is not None:
    kwargs = dict(base_size=known.base_size, crop_size=known.crop)
  else:
    kwargs = {}
  return InferenceConfig(**{**kwargs, **overrides})


class LoadedModel(NamedTuple):
  """A checkpoint ready to run: load()'s result."""

  apply_fn: Any  # (variables, images [B, H, W, 3]) -> logits [B, H, W, K]
  variables: Any
  model_config: dict[str, Any]
  dataset_meta: dict[str, list] | None  # {'classes', 'palette'} the weights came with


def load(checkpoint: str | os.PathLike, *, dtype: str | None = None) -> LoadedModel:
  """The model of a training workdir, converted dir or .pth (semseg or mmseg layout).

  Args:
    dtype: compute dtype to run with (e.g. 'bfloat16'); by default the checkpoint's.
  """
  variables, model_config, meta = weights.load_checkpoint(checkpoint)
  if 'cls' not in variables['params'] or 'num_classes' not in model_config:
    raise errors.InvalidInputError(
      f'{checkpoint} holds an ImageNet backbone, not a PSPNet: train or convert a full '
      'model first (python train.py ... --config.init_checkpoint=...)'
    )
  model_config = dict(model_config)
  if dtype is not None:
    model_config['dtype'] = dtype
  model = codec.build_model(model_config)

  def apply_fn(v: Any, x: jax.Array) -> jax.Array:
    return model.apply(v, x, train=False)

  return LoadedModel(apply_fn, variables, dict(model_config), meta)


def load_model(
  checkpoint: str | os.PathLike, *, dtype: str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
  """(apply_fn, variables, model_config) of a training workdir, converted dir or .pth."""
  return load(checkpoint, dtype=dtype)[:3]


def run_config(checkpoint: str | os.PathLike) -> ml_collections.ConfigDict | None:
  """The experiment config a training workdir was run with (its config.json), else None.

  A config.json written before a key existed reads as the key's default (config_schema.upgrade).
  """
  path = paths.as_path(checkpoint) / weights.RUN_CONFIG_FILE
  if not path.is_file():
    return None
  try:
    return config_schema.upgrade(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise errors.InvalidInputError(f'{path} is not a run config written by train.py: {e}') from e


class DatasetChoice(NamedTuple):
  """Which data set a model is, with the class names and palette it is shown with."""

  name: str | None
  class_names: tuple[str, ...]
  palette: np.ndarray  # uint8 [K, 3]


def dataset_of(
  num_classes: int,
  dataset: str | None = None,
  *,
  config: ml_collections.ConfigDict | None = None,
  meta: Mapping[str, Any] | None = None,
) -> DatasetChoice:
  """Which data set a checkpoint is: Segmenter.from_checkpoint's choice, and the exporter's.

  Args:
    num_classes: the model's.
    dataset: the caller's choice; it wins.
    config: the checkpoint's run config (run_config); its data.name comes next, else the
      benchmark of num_classes classes (datasets.by_classes).
    meta: the checkpoint's own {'classes', 'palette'} (an mmseg file's meta, kept by
      psp_jax.convert); they replace the data set's unless `dataset` is given.

  Raises:
    errors.InvalidInputError: a data set, names or palette of another number of classes.
  """
  own = meta if dataset is None and meta else {}  # An explicit data set wins.
  if dataset is None and config is not None:
    dataset = config.data.name
  dataset = dataset or datasets.by_classes(num_classes)
  return DatasetChoice(
    dataset, *class_table(dataset, num_classes, own.get('classes'), own.get('palette'))
  )


def class_table(
  dataset: str | None,
  num_classes: int,
  class_names: Sequence[str] | None = None,
  palette: np.ndarray | None = None,
) -> tuple[tuple[str, ...], np.ndarray]:
  """(class names, palette uint8 [K, 3]) of a model: the data set's, or those given.

  Raises:
    errors.InvalidInputError: a data set, names or palette of another number of classes.
  """
  known = classes.CLASS_NAMES.get(dataset)
  if known is not None and len(known) != num_classes:
    raise errors.InvalidInputError(
      f'{dataset} has {len(known)} classes, the model {num_classes}: pass the right '
      '`dataset` (--dataset)'
    )
  names = classes.names(dataset, num_classes)
  if class_names is not None:
    if len(class_names) != num_classes:
      raise errors.InvalidInputError(
        f'{len(class_names)} class names for a model of {num_classes} classes'
      )
    names = tuple(class_names)
  if palette is None:
    return names, classes.palette(dataset, num_classes)
  palette = np.asarray(palette, np.uint8)
  if palette.shape != (num_classes, 3):
    raise errors.InvalidInputError(
      f'palette of shape {palette.shape} for a model of {num_classes} classes'
    )
  return names, palette


def read_image(path: str | os.PathLike) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an image file, EXIF rotation applied (as cv2.imread does)."""
  try:
    with Image.open(path) as img:
      return np.asarray(ImageOps.exif_transpose(img).convert('RGB'))
  except OSError as e:
    raise errors.InvalidInputError(f'cannot read image {path}: {e}') from e


def as_rgb(image) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an array, a PIL image or an image file."""
  if isinstance(image, str | os.PathLike):
    return read_image(image)
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'))
  return np.asarray(image)


class Segmenter:
  """A trained PSPNet with its test procedure (official or mmseg's), palette and class names."""

  def __init__(
    self,
    apply_fn,
    variables: Any,
    *,
    num_classes: int,
    dataset: str | None = None,
    procedure: InferenceConfig | None = None,
    devices: Sequence[jax.Device] | None = None,
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | None = None,
  ):
    """apply_fn(variables, images [B, H, W, 3]) -> logits [B, H, W, num_classes].

    class_names and palette (uint8 [K, 3]), e.g. a checkpoint's own, replace the data set's.
    """
    self.dataset = dataset_of(num_classes, dataset).name
    if procedure is None:
      procedure = default_inference(self.dataset)
    self.num_classes = num_classes
    self.inference = SlidingWindowInference(
      apply_fn, variables, num_classes=num_classes, procedure=procedure, devices=devices
    )
    self.class_names, self.palette = class_table(self.dataset, num_classes, class_names, palette)

  @classmethod
  def from_checkpoint(
    cls,
    checkpoint: str | os.PathLike,
    *,
    dataset: str | None = None,
    config: ml_collections.ConfigDict | None = None,
    **inference_overrides,
  ) -> 'Segmenter':
    """Loads a training workdir, a converted checkpoint or a .pth (semseg or mmseg layout).

    Args:
      dataset: palette and names ('ade20k', 'voc2012', 'cityscapes', 'synthetic'); by
        default the checkpoint's own class names and palette (an mmseg file's meta, kept by
        psp_jax.convert) if it has them, else config.data.name, else guessed from the
        number of classes.
      config: an experiment config whose eval.* and data.crop_size set the procedure; by
        default that of a training workdir (its config.json), else default_inference: the
        data set's official test geometry, or mmseg's test (fit (2048, 512) keeping the
        ratio, whole image, no flip, logits) for a model of mmseg's variant (an mmseg .pth
        or its conversion).
      inference_overrides: InferenceConfig fields, e.g. scales=(0.5, 1.0, 1.5), flip=False;
        they win over whichever default applies.
    """
    apply_fn, variables, model_config, meta = load(checkpoint)
    if config is None:
      config = run_config(checkpoint)
    num_classes = int(model_config['num_classes'])
    choice = dataset_of(num_classes, dataset, config=config, meta=meta)
    if config is not None:
      procedure = InferenceConfig.from_config(config, **inference_overrides)
    else:
      procedure = default_inference(choice.name, model_config, **inference_overrides)
    return cls(
      apply_fn,
      variables,
      num_classes=num_classes,
      dataset=choice.name,
      procedure=procedure,
      class_names=choice.class_names,
      palette=choice.palette,
    )

  @property
  def batch_size(self) -> int:
    """Images per predict_batch step (one per local device), as predict_files reads it."""
    return self.inference.batch_size

  def predict(self, image) -> np.ndarray:
    """Class indices int32 [H, W] of an image (array [H, W, 3] RGB, PIL image or path)."""
    return self.inference.predict(as_rgb(image))

  def predict_batch(self, images: Sequence) -> list[np.ndarray]:
    """predict on several images, one per local device at a time."""
    arrays = [as_rgb(im) for im in images]
    plans = [self.inference.plan(a) for a in arrays]
    out: list[np.ndarray | None] = [None] * len(plans)
    groups: dict[tuple, list[int]] = {}
    for i, plan in enumerate(plans):
      groups.setdefault(plan.key, []).append(i)
    for idx in groups.values():
      for start in range(0, len(idx), self.inference.batch_size):
        chunk = idx[start : start + self.inference.batch_size]
        labels, _ = self.inference.run([plans[i] for i in chunk])
        for i, lab in zip(chunk, labels, strict=True):
          out[i] = lab
    return out

  def probabilities(self, image) -> np.ndarray:
    """Class probabilities float32 [H, W, K] (flip- and scale-averaged softmax)."""
    return self.inference.probabilities(as_rgb(image))

  def colorize(self, labels: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a label map in the data set's palette."""
    return visualize.colorize(labels, self.palette)

  def overlay(self, image, labels: np.ndarray | None = None, alpha: float = 0.5) -> Image.Image:
    """The image blended with its (predicted) label colours, and a legend of the classes."""
    image = as_rgb(image)
    labels = self.predict(image) if labels is None else labels
    return visualize.overlay_with_legend(image, labels, self.palette, self.class_names, alpha=alpha)

  def save(self, image, labels: np.ndarray, output_dir: str | os.PathLike, name: str) -> None:
    """Writes NAME.png (indices), NAME_color.png and NAME_overlay.png to output_dir."""
    out = pathlib.Path(output_dir)
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    # Indices as 8-bit grey when they fit (the official gray PNG), else 16-bit.
    mode_dtype = np.uint8 if self.num_classes <= 256 else np.uint16
    Image.fromarray(labels.astype(mode_dtype)).save(out / f'{name}.png')
    Image.fromarray(self.colorize(labels)).save(out / f'{name}_color.png')
    self.overlay(image, labels).save(out / f'{name}_overlay.png')


def list_images(path: str | os.PathLike) -> list[pathlib.Path]:
  """The image itself, or the images in a folder (recursively, sorted)."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise errors.NotFoundError(f'--input {path}: no such file or folder')
  images = sorted(p for p in path.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS)
  if not images:
    raise errors.NotFoundError(f'--input {path}: no images ({", ".join(IMAGE_EXTENSIONS)}) in it')
  return images


OUTPUT_SUFFIXES = ('.png', '_color.png', '_overlay.png')  # What Segmenter.save writes.


def output_name(path: pathlib.Path, root: pathlib.Path | None) -> str:
  """The output name of an input image: its path relative to a folder input, else its stem."""
  return str(path.relative_to(root).with_suffix('')) if root else path.stem


def predict_files(
  seg: Segmenter,
  files: Sequence[pathlib.Path],
  output_dir: str | os.PathLike,
  *,
  root: pathlib.Path | None = None,
  progress: bool = True,
) -> None:
  """Segmenter.save for every file, seg.batch_size images at a time.

  Args:
    seg: a Segmenter, or another model with its batch_size, predict_batch and save (the
      exported model of psp_jax.serving.artifact).
    root: output names keep the path relative to it (a folder input), else the file stem.
  """
  step = seg.batch_size
  with tqdm(total=len(files), desc='predict', unit='img', disable=not progress) as bar:
    for start in range(0, len(files), step):
      chunk = files[start : start + step]
      images = [read_image(p) for p in chunk]
      for path, image, labels in zip(chunk, images, seg.predict_batch(images), strict=True):
        seg.save(image, labels, output_dir, output_name(path, root))
      bar.update(len(chunk))
