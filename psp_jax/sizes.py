"""(height, width) pairs of config values given as one int or a pair (crop sizes, windows)."""

from collections.abc import Sequence


def pair(value: int | Sequence[int], key: str) -> tuple[int, int]:
  """(height, width) of an int (square) or a pair of positive ints.

  Args:
    value: e.g. config.data.crop_size, 473 or (512, 1024).
    key: the config key, for the message.

  Raises:
    ValueError: naming the key, for anything else.
  """
  try:
    out = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
  except (TypeError, ValueError):
    out = ()
  if len(out) != 2 or min(out) < 1:
    raise ValueError(f'{key} must be a positive int or (height, width), got {value!r}.')
  return out
