"""Tests of psp_jax.data.decode: files decoded by TensorFlow ops, eagerly and inside tf.data."""

import io
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from psp_jax.data import classes, decode, files

import datagen

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str = 'PNG', mode: str | None = None, **kw) -> bytes:
  image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kw)
  return buffer.getvalue()


def palette_png(indices: np.ndarray, palette: np.ndarray, **kw) -> bytes:
  image = Image.frombytes('P', indices.shape[::-1], indices.astype(np.uint8).tobytes())
  image.putpalette(palette.astype(np.uint8).ravel().tolist())
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', **kw)
  return buffer.getvalue()


def image_of(data: bytes) -> np.ndarray:
  image, ok, why = decode.decode_image(tf.constant(data))
  assert ok and why == b'', why
  return image.numpy()


def label_of(data: bytes) -> np.ndarray:
  raw, ok, why = decode.decode_label(tf.constant(data))
  assert ok and why == b'', why
  return raw.numpy()


def why_image(data: bytes) -> str:
  _, ok, why = decode.decode_image(tf.constant(data))
  assert not ok
  return why.numpy().decode()


def test_image_modes_are_read_as_pil_reads_them():
  for fmt, mode in [('PNG', 'L'), ('PNG', 'LA'), ('PNG', 'P'), ('JPEG', 'RGB'), ('JPEG', 'L')]:
    data = encode(RGB, fmt, mode)
    np.testing.assert_array_equal(image_of(data), datagen.decode(data), err_msg=f'{fmt} {mode}')
  for mode in ('RGB', 'L', 'P', 'RGBA'):  # 8-bit BMPs through their palette, as PIL.
    data = encode(RGB, 'BMP', mode)
    np.testing.assert_array_equal(image_of(data), datagen.decode(data), err_msg=f'BMP {mode}')
  gif = encode(RGB, 'GIF', 'P')
  np.testing.assert_array_equal(image_of(gif), datagen.decode(gif))


def test_rgba_image_drops_alpha():
  rgba = np.concatenate([RGB, np.full((5, 7, 1), 9, np.uint8)], -1)
  np.testing.assert_array_equal(image_of(encode(rgba)), RGB)


def test_16_bit_image_keeps_the_high_byte():
  deep = RGB[..., 0].astype(np.uint16) * 256 + 255
  np.testing.assert_array_equal(image_of(encode(deep)), np.repeat(RGB[..., :1], 3, -1))


@pytest.mark.parametrize('duplicates', [False, True], ids=['unique', 'duplicate_colours'])
@pytest.mark.parametrize('count', [2, 12, 256])  # Bit depths 1, 4 and 8.
def test_palette_png_label_gives_indices(count, duplicates):
  indices = RNG.integers(0, count, (6, 9)).astype(np.uint8)
  palette = RNG.integers(0, 256, (count, 3))
  if duplicates:
    palette[1::2] = palette[0]  # Every other index shares index 0's colour.
  np.testing.assert_array_equal(label_of(palette_png(indices, palette)), indices)
  with_alpha = palette_png(indices, palette, transparency=0)  # A tRNS chunk after PLTE.
  np.testing.assert_array_equal(label_of(with_alpha), indices)


def test_voc_palette_label_gives_indices():
  indices = np.array([[0, 1, 15], [20, 255, 7]], np.uint8)
  np.testing.assert_array_equal(label_of(palette_png(indices, classes.VOC_PALETTE_256)), indices)


def test_16_bit_gray_label_keeps_its_values():
  raw = np.array([[0, 3, 255], [256, 303, 65535]], np.uint16)
  np.testing.assert_array_equal(label_of(encode(raw)), raw)
  table = files.label_table(num_classes=20)
  _, ok, why = decode.map_label(tf.constant(label_of(encode(raw))), table)
  assert not ok
  assert (
    why == b'label values [256, 303, 65535] do not fit in 8 bits; expected values in 0..19, 255.'
  )


def test_gray_rgb_label_is_read_and_colour_label_is_refused():
  gray = np.stack([RGB[..., 0]] * 3, -1)
  np.testing.assert_array_equal(label_of(encode(gray)), RGB[..., 0])
  np.testing.assert_array_equal(label_of(encode(RGB[..., 0], 'BMP', 'P')), RGB[..., 0])
  _, ok, why = decode.decode_label(tf.constant(encode(RGB)))
  assert not ok and why.numpy().decode().startswith('the label is a colour image')


def test_map_label_lists_bad_values_and_maps_through_a_table():
  ade = files.label_table({0: 255, **{k: k - 1 for k in range(1, 151)}})
  label, ok, why = decode.map_label(tf.constant([[0, 1, 150]]), ade)
  assert ok and why == b''
  np.testing.assert_array_equal(label, [[255, 0, 149]])
  _, ok, why = decode.map_label(tf.constant([[*range(151, 170)]]), ade)
  assert not ok
  listed = '151, 152, 153, 154, 155, 156, 157, 158, 159, 160, ...'
  assert why == f'unexpected label values [{listed}]; expected values in 0..150.'.encode()


def test_truncated_empty_and_unknown_contentsare_reasons_not_errors():
  jpeg, png = encode(RGB, 'JPEG'), encode(RGB)
  assert why_image(jpeg[:200]) == 'cannot read the image (corrupt or truncated JPEG file).'
  assert why_image(png[:60]) == 'cannot read the image (corrupt or truncated PNG file).'
  assert why_image(b'') == 'cannot read the image (the file is empty).'
  assert why_image(b'GIF8 nonsense') == 'cannot read the image (corrupt or truncated GIF file).'
  assert why_image(b'not an image') == ('cannot read the image (not a JPEG, PNG, BMP or GIF file).')
  assert 'PGM/PPM file, which TensorFlow cannot decode' in why_image(encode(RGB, 'PPM'))
  assert 'BMP of 1 bits per pixel' in why_image(encode(RGB, 'BMP', '1'))
  _, ok, why = decode.decode_label(tf.constant(png[:60]))
  assert not ok and why == b'cannot read the label (corrupt or truncated PNG file).'


def test_decoders_give_the_same_inside_tf_data():
  indices = RNG.integers(0, 12, (6, 9)).astype(np.uint8)
  palette = RNG.integers(0, 256, (12, 3))
  palette[1] = palette[0]
  rgba = np.concatenate([RGB, np.full((5, 7, 1), 9, np.uint8)], -1)
  contents = [
    palette_png(indices, palette),
    encode(np.array([[0, 300], [65535, 7]], np.uint16)),
    encode(rgba),
    encode(RGB[..., 0].astype(np.uint16) * 257),
    encode(RGB, 'JPEG')[:200],
    encode(RGB)[:60],
    b'',
  ]
  for decoder in (decode.decode_image, decode.decode_label):
    ds = tf.data.Dataset.from_tensor_slices(contents).map(decoder, num_parallel_calls=4)
    for data, (value, ok, why) in zip(contents, ds.as_numpy_iterator(), strict=True):
      eager_value, eager_ok, eager_why = decoder(tf.constant(data))
      assert (ok, why) == (eager_ok, eager_why)
      np.testing.assert_array_equal(value, eager_value)


def pair_dir(tmp_path, image: bytes, label: bytes) -> tuple[str, str]:
  (tmp_path / 'a b é.jpg').write_bytes(image)  # A path that assertion messages escape.
  (tmp_path / 'a b é.png').write_bytes(label)
  return str(tmp_path / 'a b é.jpg'), str(tmp_path / 'a b é.png')


def test_read_pair_names_size_mismatch_and_unreadable_files(tmp_path):
  table = files.label_table(num_classes=256)
  image_path, label_path = pair_dir(tmp_path, encode(RGB, 'JPEG'), encode(RGB[:2, :3, 0]))
  pair = decode.read_pair(tf.constant(image_path), tf.constant(label_path), table)
  assert not pair['ok']
  reason = f'{label_path}: label is 3x2 (WxH) but its image {image_path} is 7x5.'
  assert pair['reason'].numpy().decode() == reason
  pair = decode.read_pair(tf.constant(str(tmp_path)), tf.constant(label_path), table)
  reason = f'{tmp_path}: cannot read the image (the file cannot be read).'
  assert pair['reason'].numpy().decode() == reason


def read_all(paths: list[tuple[str, str]], *, skip: bool) -> list[dict[str, np.ndarray]]:
  """The pairs read in a parallel tf.data map, as the list/folder sources read them."""
  table = files.label_table(num_classes=256)
  ds = tf.data.Dataset.from_tensor_slices(tuple(map(list, zip(*paths, strict=True))))
  ds = ds.map(lambda image, label: decode.read_pair(image, label, table), num_parallel_calls=2)
  with decode.reported():
    return list(decode.drop_or_raise(ds, skip=skip, what='test').as_numpy_iterator())


def test_in_tf_data_a_bad_pair_raises_by_name_or_is_skipped_and_logged(tmp_path, caplog):
  good = (tmp_path / 'good.jpg', tmp_path / 'good.png')
  good[0].write_bytes(encode(RGB, 'JPEG'))
  good[1].write_bytes(palette_png(RGB[..., 0], classes.VOC_PALETTE_256))
  bad = pair_dir(tmp_path, b'', encode(RGB[..., 0]))
  paths = [tuple(map(str, good)), bad, tuple(map(str, good))]
  with pytest.raises(files.BadExampleError) as error:
    read_all(paths, skip=False)
  assert str(error.value) == (
    f'{bad[0]}: cannot read the image (the file is empty). '
    '(set config.data.skip_bad_examples to skip it)'
  )
  with caplog.at_level(logging.WARNING):
    examples = read_all(paths, skip=True)
  assert len(examples) == 2
  np.testing.assert_array_equal(examples[0]['label'], RGB[..., 0])
  np.testing.assert_array_equal(examples[1]['image'], datagen.decode(good[0]))
  message = f'Skipped bad example 1 of test: {bad[0]}: cannot read the image (the file is empty).'
  assert message in caplog.text
