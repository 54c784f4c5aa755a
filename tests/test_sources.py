"""Tests of psp_jax.data.sources, the TFDS builders, files and classes on small fake trees."""

import io
import logging
import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from psp_jax.data import classes, files, pipeline, sources
from psp_jax.data.builders import Ade20k, Cityscapes, MissingDataError, Voc2012

import datagen

# The 19 evaluated Cityscapes label ids, in train-id order (cityscapesScripts labels.py).
EVALUATED_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def data_config(name: str, **kw) -> ml_collections.ConfigDict:
  config = dict(
    name=name,
    data_dir=None,
    root=None,
    train_list=None,
    val_list=None,
    train_split='train',
    eval_split='validation',
    num_classes=11,
    ignore_label=255,
    skip_bad_examples=False,
  )
  config.update(kw)
  return ml_collections.ConfigDict(config)


def prepare(builder_cls, manual_dir, data_dir, **kw):
  builder = builder_cls(data_dir=str(data_dir), num_workers=2, **kw)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def collect(ds: tf.data.Dataset) -> dict[tuple[int, int], dict[str, np.ndarray]]:
  """Examples by image shape (unique per example in datagen's trees)."""
  out = {}
  for example in ds.as_numpy_iterator():
    assert set(example) == {'image', 'label'}
    assert example['image'].dtype == np.uint8 and example['label'].dtype == np.uint8
    assert example['image'].shape[:2] == example['label'].shape
    shape = example['label'].shape
    assert shape not in out, f'example {shape} seen twice'
    out[shape] = example
  return out


def check_examples(config, split, expected, mapping) -> None:
  """get_source's examples equal the files: PIL-decoded images, mapped labels, pixel-wise."""
  assert sources.num_examples(config, split) == len(expected)
  got = collect(sources.get_source(config, split))
  assert set(got) == set(expected)
  for shape, (image_file, raw) in expected.items():
    np.testing.assert_array_equal(got[shape]['image'], datagen.decode(image_file))
    np.testing.assert_array_equal(got[shape]['label'], mapping(raw))


@pytest.mark.parametrize('as_zip', [False, True], ids=['folder', 'zip'])
def test_ade20k_builder(tmp_path, as_zip):
  expected = datagen.write_ade20k(tmp_path / 'manual', (5, 3), as_zip=as_zip)
  prepare(Ade20k, tmp_path / 'manual', tmp_path / 'tfds')
  config = data_config('ade20k', data_dir=str(tmp_path / 'tfds'), num_classes=150)

  def mapping(raw):  # 0 ('other') -> 255, k -> k - 1.
    return np.where(raw == 0, 255, raw.astype(np.int32) - 1).astype(np.uint8)

  for split in ('train', 'validation'):
    check_examples(config, split, expected[split], mapping)
  assert sources.num_examples(config, 'val') == 3  # semseg's split name works too.


@pytest.mark.parametrize('train_list', [False, True], ids=['aug_minus_val', 'train_aug_txt'])
def test_voc2012_builder(tmp_path, train_list):
  expected = datagen.write_voc2012(tmp_path / 'manual', (4, 3), train_list=train_list)
  prepare(Voc2012, tmp_path / 'manual', tmp_path / 'tfds')
  config = data_config('voc2012', data_dir=str(tmp_path / 'tfds'), num_classes=21)
  # Validation labels are palette PNGs: their indices (with 255) must come out, not colours.
  val_label = next(iter(expected['validation'].values()))[0].parents[1] / 'SegmentationClass'
  assert Image.open(next(val_label.glob('*.png'))).mode == 'P'
  for split in ('train', 'validation'):
    check_examples(config, split, expected[split], lambda raw: raw)


@pytest.mark.parametrize('as_zip', [False, True], ids=['folder', 'zip'])
def test_cityscapes_builder(tmp_path, as_zip):
  expected = datagen.write_cityscapes(tmp_path / 'manual', (4, 2), as_zip=as_zip)
  prepare(Cityscapes, tmp_path / 'manual', tmp_path / 'tfds')
  config = data_config('cityscapes', data_dir=str(tmp_path / 'tfds'), num_classes=19)
  table = np.full(256, 255, np.uint8)
  table[EVALUATED_IDS] = np.arange(19)

  for split in ('train', 'validation'):
    check_examples(config, split, expected[split], lambda raw: table[raw])
  assert tuple(table[:34]) == classes.CITYSCAPES_TRAIN_IDS


def test_tfds_source_shards_disjoint_and_complete(tmp_path):
  config = data_config('synthetic', data_dir=str(tmp_path), num_classes=11)
  config.synthetic = ml_collections.ConfigDict(dict(image_size=20, num_train=7, num_val=2, seed=3))
  whole = [e['image'].tobytes() for e in sources.get_source(config, 'train').as_numpy_iterator()]
  assert len(set(whole)) == 7 == sources.num_examples(config, 'train')
  for count in (2, 3):
    parts = [
      [
        e['image'].tobytes()
        for e in sources.get_source(
          config, 'train', process_index=i, process_count=count
        ).as_numpy_iterator()
      ]
      for i in range(count)
    ]
    assert sorted(b for part in parts for b in part) == sorted(whole)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
  shuffled = sources.get_source(config, 'train', shuffle_seed=0)
  assert sorted(e['image'].tobytes() for e in shuffled.as_numpy_iterator()) == sorted(whole)


def test_list_source_and_sharding(tmp_path):
  expected = datagen.write_list(tmp_path, 'train', 7, num_classes=5)
  datagen.write_list(tmp_path, 'val', 2, num_classes=5, seed=1)
  config = data_config(
    'list',
    root=str(tmp_path),
    train_list='list/train.txt',
    val_list='list/val.txt',
    num_classes=5,
  )
  check_examples(config, 'train', expected['train'], lambda raw: raw)
  assert sources.num_examples(config, 'validation') == 2
  parts = [
    collect(sources.get_source(config, 'train', process_index=i, process_count=3)) for i in range(3)
  ]
  assert sorted(s for part in parts for s in part) == sorted(expected['train'])


def test_list_paths_with_spaces_take_a_tab(tmp_path):
  expected = datagen.write_list(tmp_path, 'train', 2, num_classes=5)
  spaced = tmp_path / 'my data'
  (tmp_path / 'data').rename(spaced)
  lines = [f'my data/img/train_{i:03d}.jpg\tmy data/gt/train_{i:03d}.png' for i in range(2)]
  (tmp_path / 'list' / 'train.txt').write_text('\n'.join(lines) + '\n')
  config = data_config('list', root=str(tmp_path), train_list='list/train.txt', num_classes=5)
  got = collect(sources.get_source(config, 'train'))
  assert sorted(got) == sorted(expected['train'])
  (tmp_path / 'list' / 'train.txt').write_text(lines[0].replace('\t', ' ') + '\n')
  with pytest.raises(ValueError, match=r'train.txt:1: expected .* a TAB between them'):
    sources.get_source(config, 'train')


def test_folder_source(tmp_path):
  expected = datagen.write_folder(tmp_path, 'val', 5, num_classes=4)
  config = data_config('folder', root=str(tmp_path), num_classes=4)
  check_examples(config, 'validation', expected['val'], lambda raw: raw)  # 'val' folder found.
  parts = [
    collect(sources.get_source(config, 'val', process_index=i, process_count=2)) for i in range(2)
  ]
  assert sorted(s for part in parts for s in part) == sorted(expected['val'])


# --- Bad input. ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'builder_cls, words',
  [
    (Ade20k, ['ADEChallengeData2016.zip', 'images/training', 'annotations/validation']),
    (Voc2012, ['JPEGImages', 'SegmentationClassAug', 'val.txt']),
    (Cityscapes, ['leftImg8bit_trainvaltest.zip', 'gtFine', '_gtFine_labelIds.png']),
  ],
)
def test_missing_manual_files_say_what_is_expected(tmp_path, builder_cls, words):
  with pytest.raises(MissingDataError) as error:
    builder_cls.locate(tmp_path)
  for word in [str(tmp_path), *words]:
    assert word in str(error.value)


def test_unprepared_source_says_how_to_prepare(tmp_path):
  config = data_config('cityscapes', data_dir=str(tmp_path), num_classes=19)
  with pytest.raises(MissingDataError, match=r'python -m psp_jax\.data\.prepare cityscapes'):
    sources.get_source(config, 'train')


def test_wrong_num_classes_and_unknown_name(tmp_path):
  with pytest.raises(ValueError, match='num_classes=150'):
    sources.get_source(data_config('ade20k', data_dir=str(tmp_path), num_classes=21), 'train')
  with pytest.raises(ValueError, match="Unknown config.data.name 'imagenet'"):
    sources.get_source(data_config('imagenet'), 'train')


def test_missing_folder_and_list_entries(tmp_path):
  config = data_config('folder', root=str(tmp_path), num_classes=4)
  with pytest.raises(MissingDataError, match=r'images/train.*exists'):
    sources.get_source(config, 'train')
  datagen.write_list(tmp_path, 'train', 3, num_classes=4)
  gone = tmp_path / 'data' / 'gt' / 'train_001.png'
  gone.unlink()
  config = data_config('list', root=str(tmp_path), train_list='list/train.txt', num_classes=4)
  with pytest.raises(MissingDataError, match='train_001.png'):
    sources.get_source(config, 'train')
  config.skip_bad_examples = True
  assert sources.num_examples(config, 'train') == 2


def test_corrupt_image_in_builder_names_the_file(tmp_path):
  datagen.write_ade20k(tmp_path / 'manual', (3, 2))
  bad = (
    tmp_path / 'manual' / 'ADEChallengeData2016' / 'images' / 'training' / 'ADE_train_00000002.jpg'
  )
  bad.write_bytes(bad.read_bytes()[:200])  # Truncated JPEG.
  with pytest.raises(files.BadExampleError, match='ADE_train_00000002.jpg'):
    prepare(Ade20k, tmp_path / 'manual', tmp_path / 'tfds')
  builder = prepare(Ade20k, tmp_path / 'manual', tmp_path / 'tfds2', skip_bad_examples=True)
  assert builder.info.splits['train'].num_examples == 2


def test_label_of_another_size_names_the_file(tmp_path, caplog):
  datagen.write_list(tmp_path, 'train', 4, num_classes=3)
  label = tmp_path / 'data' / 'gt' / 'train_002.png'
  datagen.save(label, np.zeros((5, 7), np.uint8))
  config = data_config('list', root=str(tmp_path), train_list='list/train.txt', num_classes=3)
  with pytest.raises(tf.errors.OpError) as error:
    list(sources.get_source(config, 'train').as_numpy_iterator())
  assert 'train_002.png: label is 7x5' in str(error.value)
  assert 'train_002.jpg is 28x18' in str(error.value)
  config.skip_bad_examples = True
  with caplog.at_level(logging.WARNING):  # numpy_batches logs the skips.
    assert len(list(pipeline.numpy_batches(sources.get_source(config, 'train')))) == 3
  assert 'Skipped bad example 1 of list train' in caplog.text


def test_bad_label_values_are_listed(tmp_path):
  datagen.write_folder(tmp_path, 'train', 2, num_classes=9)
  config = data_config('folder', root=str(tmp_path), num_classes=6)
  with pytest.raises(
    tf.errors.OpError, match=r'img_00[01].png: unexpected label values \[6, 7, 8\]'
  ):
    list(sources.get_source(config, 'train').as_numpy_iterator())


# --- files.py conversions. -------------------------------------------------------------------


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buffer = io.BytesIO()
  (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buffer, format='PNG')
  return buffer.getvalue()


def test_decode_image_modes():
  rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  gray = rgb[..., 0]
  np.testing.assert_array_equal(files.decode_image(_png(gray), 'g'), np.stack([gray] * 3, -1))
  rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(files.decode_image(_png(rgba), 'a'), rgb)  # Alpha dropped.
  deep = gray.astype(np.uint16) * 256 + 255
  np.testing.assert_array_equal(files.decode_image(_png(deep), 'd'), np.stack([gray] * 3, -1))
  with pytest.raises(files.BadExampleError, match='broken.jpg: cannot read the image'):
    files.decode_image(b'\xff\xd8 not a jpeg', 'broken.jpg')


def test_decode_label_modes():
  table = files.label_table(num_classes=20)
  small = np.array([[0, 3], [255, 19]], np.uint16)
  label = files.map_label(files.decode_label(_png(small), 'l16'), table, 'l16')
  np.testing.assert_array_equal(label, small.astype(np.uint8))
  with pytest.raises(files.BadExampleError, match=r'big.png: label values \[303\] do not fit'):
    files.map_label(
      files.decode_label(_png(small + np.uint16(300) * (small == 3)), 'big.png'), table, 'big.png'
    )
  gray_rgb = np.stack([small.astype(np.uint8)] * 3, -1)
  np.testing.assert_array_equal(files.decode_label(_png(gray_rgb), 'rgb'), small)
  gray_rgb[0, 0, 1] = 9
  with pytest.raises(files.BadExampleError, match='colour image'):
    files.decode_label(_png(gray_rgb), 'colour.png')


def test_class_tables():
  expected = {'ade20k': 150, 'voc2012': 21, 'cityscapes': 19, 'synthetic': 11}
  for name, count in expected.items():
    assert len(classes.CLASS_NAMES[name]) == count == len(set(classes.CLASS_NAMES[name]))
    assert classes.PALETTES[name].shape == (count, 3)
    assert classes.PALETTES[name].dtype == np.uint8
  assert classes.CLASS_NAMES['ade20k'][:3] == ('wall', 'building', 'sky')
  assert classes.CLASS_NAMES['voc2012'][20] == 'tvmonitor'
  voc = classes.PALETTES['voc2012']
  assert voc[1].tolist() == [128, 0, 0] and voc[15].tolist() == [192, 128, 128]
  assert voc[20].tolist() == [0, 64, 128]
  assert classes.VOC_PALETTE_256[255].tolist() == [224, 224, 192]
  assert classes.PALETTES['cityscapes'][13].tolist() == [0, 0, 142]  # car
  assert classes.PALETTES['ade20k'][0].tolist() == [120, 120, 120]


def test_missing_files_path_is_reported(tmp_path):
  config = data_config('list', root=str(tmp_path), train_list='nope.txt', num_classes=3)
  with pytest.raises(MissingDataError, match='nope.txt is not a file'):
    sources.num_examples(config, 'train')


# --- Bad files in list/folder sources, as the training loop reads them. -------------------


def test_corrupt_label_png_is_named_or_skipped_and_counted(tmp_path, caplog):
  datagen.write_list(tmp_path, 'train', 4, num_classes=3)
  bad = tmp_path / 'data' / 'gt' / 'train_001.png'
  bad.write_bytes(bad.read_bytes()[:60])  # Truncated PNG.
  config = data_config('list', root=str(tmp_path), train_list='list/train.txt', num_classes=3)
  # numpy_batches turns TensorFlow's wrapped error back into the file's own message.
  with pytest.raises(files.BadExampleError) as error:
    list(pipeline.numpy_batches(sources.get_source(config, 'train')))
  message = str(error.value)
  assert message.startswith(f'{bad}: cannot read the label') and 'skip_bad_examples' in message
  assert 'Traceback' not in message
  config.skip_bad_examples = True
  with caplog.at_level(logging.WARNING):
    assert len(list(pipeline.numpy_batches(sources.get_source(config, 'train')))) == 3
  assert f'Skipped bad example 1 of list train: {bad}: cannot read the label' in caplog.text


def test_out_of_range_labels_are_skipped_and_counted(tmp_path, caplog):
  datagen.write_folder(tmp_path, 'train', 3, num_classes=4)
  label = tmp_path / 'labels' / 'train' / 'a' / 'img_001.png'
  datagen.save(label, np.full((17, 26), 7, np.uint8))  # Class 7 of 4 (255 would be fine).
  config = data_config('folder', root=str(tmp_path), num_classes=4, skip_bad_examples=True)
  with caplog.at_level(logging.WARNING):  # numpy_batches logs the skips.
    assert len(list(pipeline.numpy_batches(sources.get_source(config, 'train')))) == 2
  assert f'Skipped bad example 1 of folder train: {label}: unexpected label values [7]' in (
    caplog.text
  )


def test_empty_folder_and_empty_list_are_named(tmp_path):
  (tmp_path / 'images' / 'train').mkdir(parents=True)
  (tmp_path / 'labels' / 'train').mkdir(parents=True)
  config = data_config('folder', root=str(tmp_path), num_classes=4)
  with pytest.raises(MissingDataError, match=f'{tmp_path / "images" / "train"} holds no images'):
    sources.get_source(config, 'train')
  (tmp_path / 'empty.txt').write_text('\n')
  config = data_config('list', root=str(tmp_path), train_list='empty.txt', num_classes=4)
  with pytest.raises(MissingDataError, match=r'empty.txt \(config.data.train_list\) lists no'):
    sources.num_examples(config, 'train')


def test_gray_rgba_and_16_bit_image_files_are_read_as_rgb(tmp_path):
  expected = datagen.write_folder(tmp_path, 'train', 3, num_classes=4)
  shapes = sorted(expected['train'])
  converted = {}
  for shape, mode in zip(shapes, ['L', 'RGBA', 'I;16'], strict=True):
    path, _ = expected['train'][shape]
    rgb = datagen.decode(path)
    if mode == 'L':
      array = rgb[..., 0]
    elif mode == 'RGBA':
      array = np.concatenate([rgb, np.full((*shape, 1), 9, np.uint8)], -1)
    else:
      array = rgb[..., 0].astype(np.uint16) * 257  # 16-bit: the high byte is the 8-bit value.
    path.unlink()
    datagen.save(path.with_suffix('.png'), array)
    converted[shape] = rgb if mode == 'RGBA' else np.repeat(rgb[..., :1], 3, -1)
  config = data_config('folder', root=str(tmp_path), num_classes=4)
  got = collect(sources.get_source(config, 'train'))
  for shape in shapes:
    np.testing.assert_array_equal(got[shape]['image'], converted[shape])


@pytest.mark.parametrize('skip', [False, True], ids=['stop', 'skip'])
def test_file_sources_run_no_python_inside_tf_data(tmp_path, skip):
  # A Python call inside tf.data can deadlock the iterator's destructor (it holds the GIL).
  datagen.write_folder(tmp_path, 'train', 2, num_classes=4)
  ds = sources.get_source(
    data_config('folder', root=str(tmp_path), skip_bad_examples=skip), 'train'
  )
  policy = tf.data.experimental.ExternalStatePolicy.WARN  # The skip counter is a variable.
  graph = tf.compat.v1.GraphDef.FromString(
    ds._as_serialized_graph(external_state_policy=policy).numpy()
  )
  ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
  python_ops = {op for op in ops if op.startswith(('PyFunc', 'EagerPyFunc'))}
  assert 'ParallelMapDatasetV2' in ops and not python_ops


def test_pgm_and_ppm_images_are_refused_by_name(tmp_path):
  datagen.write_folder(tmp_path, 'train', 2, num_classes=4)
  pgm = tmp_path / 'images' / 'train' / 'img_009.pgm'
  Image.fromarray(np.zeros((4, 6), np.uint8)).save(pgm)
  config = data_config('folder', root=str(tmp_path), num_classes=4)
  with pytest.raises(
    MissingDataError, match=f'1 PGM/PPM images .* cannot be read .*{re.escape(str(pgm))}'
  ):
    sources.num_examples(config, 'train')
