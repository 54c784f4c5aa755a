"""Image and label files decoded by TensorFlow ops alone, for the list/folder sources.

The rules are files.py's (PIL's): images become uint8 [H, W, 3] RGB, labels their raw values
(a palette PNG its indices). No Python runs inside tf.data, and a corrupt file is reported
with its name (`_attempt`, `drop_or_raise`, `reported`).
Design: docs/design.md#decoding-with-tensorflow-ops
"""

import base64
import contextlib
import functools
import logging
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from psp_jax.data import files

_MARK = 'psp_jax.BadExampleError:'  # Precedes the base64 message in a bad example's error.
_FORMATS = ('JPEG', 'PNG', 'BMP', 'GIF')
_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM', b'GIF8')
_COLOUR_LABEL = (
  'the label is a colour image; labels must hold class indices (a grayscale or palette PNG). '
  'Convert colour-coded labels to indices first.'
)


def _palette_chunk(depth: int) -> bytes:
  """The PLTE chunk of the palette i -> (i, i, i) over all 2**depth indices, with its CRC."""
  body = b'PLTE' + np.repeat(np.arange(2**depth, dtype=np.uint8), 3).tobytes()
  return struct.pack('>I', len(body) - 4) + body + struct.pack('>I', zlib.crc32(body))


# Indexed by bit depth (palettes have 1, 2, 4 or 8). Every index gets an entry, so a pixel
# whose index lies past the file's own palette still comes out as that index (as in PIL).
_INDEX_PALETTES = [_palette_chunk(d) if d in (1, 2, 4, 8) else b'' for d in range(9)]


def _graph_only(fn: Callable) -> Callable:
  """fn for tf.data, traced as written: it builds its graph ops itself (tf.cond), so
  AutoGraph's rewriting would only cost tracing time."""
  return tf.autograph.experimental.do_not_convert(fn)


def _attempt(fn: Callable, arg: tf.Tensor, blank):
  """(fn(arg), True), or (blank, False) where fn raises (a corrupt or unreadable file).

  The one-element dataset is instantiated on every call, at a cost that grows with fn's
  graph: fn must be a few ops.

  Args:
    fn: tensor -> a structure of tensors.
    arg: fn's argument.
    blank: fn's structure and dtypes, returned where fn raises.

  Returns:
    (fn(arg) or blank, bool scalar).
  """
  ds = tf.data.Dataset.from_tensors(arg).map(_graph_only(lambda x: (fn(x), tf.constant(True))))
  fallback = tf.data.Dataset.from_tensors((blank, tf.constant(False)))
  return ds.ignore_errors().concatenate(fallback).take(1).get_single_element()


def _bytes(data: tf.Tensor, offset, size: int) -> tf.Tensor:
  """int32 [size]: the bytes of data from offset, zeros past its end (never raises)."""
  offset = tf.clip_by_value(offset, 0, tf.strings.length(data))
  padded = tf.strings.join([tf.strings.substr(data, offset, size), b'\0' * size])
  values = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, size), tf.uint8), tf.int32)
  values.set_shape([size])
  return values


def _number(values: tf.Tensor, *, big_endian: bool) -> tf.Tensor:
  """int32: the unsigned integer of int32 bytes [n] (n <= 3, or 4 below 2**31)."""
  weights = 256 ** np.arange(values.shape[0], dtype=np.int32)
  return tf.reduce_sum(values * (weights[::-1] if big_endian else weights))


def _header(data: tf.Tensor) -> dict[str, tf.Tensor]:
  """The format of a file's bytes and the header fields the decoders need (never raises)."""
  head = _bytes(data, 0, 34)  # PNG's IHDR and BMP's info header fields end at byte 33.
  found = tf.stack([tf.strings.substr(data, 0, len(m)) == m for m in _MAGIC])
  bits = _number(head[28:30], big_endian=False)
  compression = _number(head[30:34], big_endian=False)
  # An OS/2 BMP header (shorter than 40 bytes) puts these fields elsewhere.
  bmp_info = _number(head[14:18], big_endian=False) >= 40
  deep = ((bits == 24) | (bits == 32)) & ((compression == 0) | (compression == 3))
  return {
    'format': tf.where(tf.reduce_any(found), tf.argmax(tf.cast(found, tf.int32)), -1),
    'empty': tf.strings.length(data) == 0,
    'netpbm': tf.strings.regex_full_match(tf.strings.substr(data, 0, 2), 'P[1-7]'),
    'depth': head[24],  # PNG IHDR: bit depth, then colour type.
    'colour_type': head[25],
    'bits': bits,
    'bmp_ok': bmp_info & (deep | ((bits == 8) & (compression == 0))),
    'bmp_palette': bmp_info & (bits == 8),
  }


def _is(header: dict[str, tf.Tensor], name: str) -> tf.Tensor:
  return tf.equal(header['format'], _FORMATS.index(name))


def _why(what: str, header: dict[str, tf.Tensor], decoded: tf.Tensor) -> tf.Tensor:
  """'' for a readable file, else 'cannot read the <what> (<why>).'."""
  known = header['format'] >= 0
  bmp_ok = ~_is(header, 'BMP') | header['bmp_ok']
  name = tf.gather(_FORMATS, tf.maximum(header['format'], 0))
  bmp = ['a BMP of ', tf.strings.as_string(header['bits']), ' bits per pixel or compressed']
  detail = tf.where(
    known,
    tf.where(
      bmp_ok,
      tf.strings.join(['corrupt or truncated ', name, ' file']),
      tf.strings.join([*bmp, '; save it as PNG']),
    ),
    tf.where(
      header['empty'],
      'the file is empty',
      tf.where(
        header['netpbm'],
        'a PGM/PPM file, which TensorFlow cannot decode; save it as PNG',
        'not a JPEG, PNG, BMP or GIF file',
      ),
    ),
  )
  ok = known & bmp_ok & decoded
  return tf.where(ok, '', tf.strings.join([f'cannot read the {what} (', detail, ').']))


def _accurate_jpeg(data: tf.Tensor) -> tf.Tensor:
  # The accurate integer DCT, as PIL and cv2.imread use (TF's default differs by a level).
  return tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE')


def _first_frame(data: tf.Tensor) -> tf.Tensor:
  # PNG (16 bits: the high byte), GIF (first frame), BMP (8 bits: the indices, as gray).
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def _bmp_palette(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """An 8-bit BMP's palette as uint8 [256, 3] RGB (from B, G, R, 0) and its length."""
  count = _number(_bytes(data, 46, 4), big_endian=False)
  count = tf.where((count <= 0) | (count > 256), 256, count)
  start = 14 + _number(_bytes(data, 14, 4), big_endian=False)
  return tf.cast(tf.reshape(_bytes(data, start, 1024), [256, 4])[:, 2::-1], tf.uint8), count


def _image(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(uint8 [H, W, 3] RGB, ok, why) of an image file's bytes."""
  header = _header(data)
  blank = tf.zeros([1, 1, 3], tf.uint8)
  image, decoded = tf.cond(
    _is(header, 'JPEG'),
    lambda: _attempt(_accurate_jpeg, data, blank),
    lambda: _attempt(_first_frame, data, blank),
  )
  colours, count = _bmp_palette(data)

  def coloured():
    # TensorFlow reads an 8-bit BMP's indices as gray; one past the palette is corrupt.
    index = tf.cast(image[..., 0], tf.int32)
    return tf.gather(colours, index), tf.reduce_max(index) < count

  image, decoded = tf.cond(
    _is(header, 'BMP') & header['bmp_palette'] & decoded, coloured, lambda: (image, decoded)
  )
  image.set_shape([None, None, 3])
  why = _why('image', header, decoded)
  return image, tf.equal(why, ''), why


def _index_palette(data: tf.Tensor, depth: tf.Tensor) -> tf.Tensor:
  """A palette PNG's bytes with its PLTE chunk swapped for the identity palette of its depth."""
  # PLTE comes before IDAT, after IHDR and a few small optional chunks: its first mention
  # is the chunk (a mangled file fails to decode, as it should).
  before = tf.strings.split(data, 'PLTE', maxsplit=1)[0]
  start = tf.strings.length(before) - 4
  end = start + 12 + _number(_bytes(data, start, 4), big_endian=True)
  chunk = tf.gather(_INDEX_PALETTES, tf.clip_by_value(depth, 0, 8))
  rest = tf.strings.substr(data, tf.clip_by_value(end, 0, tf.strings.length(data)), -1)
  return tf.strings.join([tf.strings.substr(data, 0, tf.maximum(start, 0)), chunk, rest])


def _label(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(int32 [H, W] raw values, ok, why) of a label file's bytes."""
  header = _header(data)
  png, depth, colour_type = _is(header, 'PNG'), header['depth'], header['colour_type']
  palette = png & (colour_type == 3)
  data = tf.where(palette, _index_palette(data, depth), data)

  def first(decode: Callable, colour: bool) -> Callable:
    """An attempt's fn: channel 0 of decode's pixels, and whether all channels agree."""

    def fn(d):
      pixels = decode(d)
      same = tf.reduce_all(tf.equal(pixels, pixels[..., :1])) if colour else tf.constant(True)
      return tf.cast(pixels[..., 0], tf.int32), same

    return lambda: _attempt(fn, data, (tf.zeros([1, 1], tf.int32), tf.constant(True)))

  # Only 16-bit gray keeps all its bits (PIL's 'I;16'); gray + alpha is read as 8-bit gray.
  gray16 = first(lambda d: tf.io.decode_png(d, channels=1, dtype=tf.uint16), colour=False)
  gray = first(lambda d: tf.io.decode_png(d, channels=1), colour=False)
  # The swapped-in palette's colours are the indices: no channels to compare.
  indexed = first(lambda d: tf.io.decode_png(d, channels=3), colour=False)
  jpeg, other = first(_accurate_jpeg, colour=True), first(_first_frame, colour=True)
  (raw, same), decoded = tf.cond(
    png & (colour_type == 0) & (depth == 16),
    gray16,
    lambda: tf.cond(
      png & ((colour_type == 0) | (colour_type == 4)),
      gray,
      lambda: tf.cond(palette, indexed, lambda: tf.cond(_is(header, 'JPEG'), jpeg, other)),
    ),
  )
  why = _why('label', header, decoded)
  why = tf.where(tf.equal(why, '') & ~same, _COLOUR_LABEL, why)
  return raw, tf.equal(why, ''), why


def decode_image(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Decodes an image file's bytes to RGB (files.decode_image's rules), never raising.

  Args:
    data: string scalar, the file's bytes.

  Returns:
    (uint8 [H, W, 3], bool ok, string why: '' or the reason after '<file>: ').
  """
  return _image(data)


def decode_label(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Decodes a label file's bytes to raw values (files.decode_label's rules), never raising.

  Args:
    data: string scalar, the file's bytes.

  Returns:
    (int32 [H, W] raw values, bool ok, string why: '' or the reason after '<file>: ').
  """
  return _label(data)


def _read(path: tf.Tensor, what: str) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """_image or _label ('image' or 'label') of the file at path, or why it cannot be opened."""
  data, opened = _attempt(tf.io.read_file, path, tf.constant(b''))
  value, ok, why = (_image if what == 'image' else _label)(data)
  unread = f'cannot read the {what} (the file cannot be read).'
  return value, ok & opened, tf.where(opened, why, unread)


def _listed(values: tf.Tensor, limit: int = 10) -> tf.Tensor:
  """'[a, b, ...]' of values (distinct, in order), at most limit of them."""
  shown = tf.strings.reduce_join(tf.strings.as_string(values[:limit]), separator=', ')
  return tf.strings.join(['[', shown, tf.where(tf.size(values) > limit, ', ...', ''), ']'])


def map_label(raw: tf.Tensor, table: np.ndarray) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Applies a files.label_table in-graph, as files.map_label.

  Args:
    raw: int32 [H, W] raw label values.
    table: int16 [256] from files.label_table.

  Returns:
    (uint8 [H, W] classes (255 = ignore), bool ok, string why: '' or the reason after
    '<file>: ', which lists the raw values the table marks invalid or that exceed 255).
  """
  expected = files.describe_table(table)
  # One histogram gives both the check and the values to list (tf.gather and tf.unique cost
  # several times more per pixel).
  present = tf.math.bincount(tf.reshape(raw, [-1]), minlength=256) > 0
  unexpected = tf.where(present[:256] & (table == files.INVALID))[:, 0]
  wide = tf.where(present[256:])[:, 0] + 256
  ok = (tf.size(unexpected) == 0) & (tf.size(wide) == 0)
  valid = np.flatnonzero(table != files.INVALID)
  if np.array_equal(table[valid], valid):  # Classes are the raw values (list/folder tables).
    label = tf.cast(raw, tf.uint8)
  else:
    label = tf.gather(tf.constant(table.astype(np.uint8)), tf.minimum(raw, 255))
  # Values past 8 bits are named first, as files.map_label does.
  why = tf.where(
    tf.size(wide) > 0,
    tf.strings.join(
      ['label values ', _listed(wide), f' do not fit in 8 bits; expected {expected}.']
    ),
    tf.strings.join(['unexpected label values ', _listed(unexpected), f'; expected {expected}.']),
  )
  return label, ok, tf.where(ok, '', why)


def read_pair(image_path: tf.Tensor, label_path: tf.Tensor, table: np.ndarray) -> dict:
  """Reads, decodes, checks and maps one (image, label) pair, as files.decode_pair.

  Args:
    image_path: string scalar.
    label_path: string scalar.
    table: int16 [256] from files.label_table.

  Returns:
    {'image': uint8 [H, W, 3], 'label': uint8 [H, W], 'ok': bool, 'reason': string}: reason
    names the first bad file and what is wrong with it ('' where ok).
  """
  image, image_ok, image_why = _read(image_path, 'image')
  raw, raw_ok, raw_why = _read(label_path, 'label')
  label, values_ok, values_why = map_label(raw, table)
  size, image_size = tf.shape(raw), tf.shape(image)
  same = tf.reduce_all(size == image_size[:2])
  # Same check as util/dataset.py SemData.__getitem__ ("Image & label shape mismatch").
  as_text = tf.strings.as_string
  size_why = tf.strings.join(
    ['label is ', as_text(size[1]), 'x', as_text(size[0]), ' (WxH) but its image ', image_path]
    + [' is ', as_text(image_size[1]), 'x', as_text(image_size[0]), '.']
  )
  named = lambda path, why: tf.strings.join([path, ': ', why])  # noqa: E731
  reason = tf.where(
    image_ok,
    tf.where(
      raw_ok,
      tf.where(same, named(label_path, values_why), named(label_path, size_why)),
      named(label_path, raw_why),
    ),
    named(image_path, image_why),
  )
  ok = image_ok & raw_ok & same & values_ok
  return {'image': image, 'label': label, 'ok': ok, 'reason': tf.where(ok, '', reason)}


@functools.cache
def _skipped() -> tf.queue.FIFOQueue:
  """The process's queue of skipped-example messages, filled in-graph, logged by reported().

  Unbounded (capacity -1): an enqueue must never block tf.data, even with no one reading.
  """
  return tf.queue.FIFOQueue(-1, [tf.string], shapes=[[]])


_drain_lock = threading.Lock()  # size() then dequeue_many() must not interleave.


def _kept(element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {k: v for k, v in element.items() if k not in ('ok', 'reason')}


def drop_or_raise(ds: tf.data.Dataset, *, skip: bool, what: str) -> tf.data.Dataset:
  """Ends the stream of read_pair results at a bad example, or skips and counts it.

  Args:
    ds: read_pair's {'image', 'label', 'ok', 'reason'} elements (other keys pass through).
    skip: config.data.skip_bad_examples.
    what: the source, e.g. 'list train', for the skip messages.

  Returns:
    The good examples without 'ok' and 'reason'. Without skip, a
    bad one raises InvalidArgumentError (its message readable, and marked for reported());
    with skip, it is left out and 'Skipped bad example N of <what>: <reason>' queued for
    reported() to log, N counting this source's skips.
  """
  if not skip:

    def check(e):
      message = tf.strings.join([e['reason'], ' (set config.data.skip_bad_examples to skip it)'])
      # base64 survives the escaping of the assertion's text, so reported() gets it exact.
      marked = tf.strings.join([_MARK, tf.io.encode_base64(message)])
      with tf.control_dependencies([tf.debugging.Assert(e['ok'], [message, marked])]):
        return {k: tf.identity(v) for k, v in _kept(e).items()}

    return ds.map(_graph_only(check))
  count = tf.Variable(0, dtype=tf.int64, trainable=False)  # This source's skips, all passes.
  queue = _skipped()

  def keep(e):
    def skipped():
      number = tf.strings.as_string(count.assign_add(1))
      message = tf.strings.join(['Skipped bad example ', number, f' of {what}: ', e['reason']])
      with tf.control_dependencies([queue.enqueue(message)]):
        return tf.constant(False)

    return tf.cond(e['ok'], lambda: tf.constant(True), skipped)

  # filter runs its predicate in order, one element at a time: the numbers count up.
  return ds.filter(_graph_only(keep)).map(_graph_only(_kept))


def log_skipped() -> None:
  """Logs (warning) the skipped-example messages queued so far, in order."""
  with _drain_lock:
    queue = _skipped()
    messages = queue.dequeue_many(queue.size()).numpy()
  for message in messages:
    logging.warning('%s', message.decode('utf-8', 'replace'))


@contextlib.contextmanager
def reported() -> Iterator[None]:
  """Around reading a tf.data pipeline: a bad example's error becomes files.BadExampleError
  with just its message (the file and what is wrong), and skipped examples are logged.

  Yields:
    Nothing; a marked tf.errors.InvalidArgumentError raised inside becomes BadExampleError.
  """
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    match = re.search(re.escape(_MARK) + r'([A-Za-z0-9_-]*)', str(e))
    if match is None:
      raise
    token = match.group(1)
    message = base64.urlsafe_b64decode(token + '=' * (-len(token) % 4)).decode('utf-8', 'replace')
    raise files.BadExampleError(message) from None
  finally:
    log_skipped()
