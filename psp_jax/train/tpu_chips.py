"""The TPU generations the pre-flight knows: each chip's public figures and its list price.

One table of each (CHIPS, PRICES), keyed by the generation a topology names ('v5e', ...):
the pre-flight's peaks, its HBM and the bill come from here and nowhere else.
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation (peak_flops: bfloat16 MXU).

  devices_per_chip: JAX devices a chip shows (TPU7x: one a TensorCore, two a chip; the
  others one a chip). A compiled program is per device: its memory is set against
  hbm_bytes / devices_per_chip and its FLOPs against peak_flops / devices_per_chip.
  """

  name: str
  peak_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  source: str
  devices_per_chip: int = 1
  # Bidirectional inter-chip interconnect (ICI) bandwidth a chip, as its page gives it; None
  # where the table has no figure (the pre-flight then leaves the interconnect out).
  ici_bytes_per_s: float | None = None

  @property
  def device(self) -> str:
    """What a compiled program's figures are of, in words: 'a chip', 'a device (1/2 chip)'."""
    return 'a chip' if self.devices_per_chip == 1 else f'a device (1/{self.devices_per_chip} chip)'

  @property
  def device_peak_flops(self) -> float:
    return self.peak_flops / self.devices_per_chip

  @property
  def device_hbm_bytes(self) -> int:
    return self.hbm_bytes // self.devices_per_chip

  @property
  def device_hbm_bytes_per_s(self) -> float:
    return self.hbm_bytes_per_s / self.devices_per_chip


@dataclasses.dataclass(frozen=True)
class Price:
  """On-demand list price of one chip-hour, as a public page showed it on `date`."""

  usd_per_chip_hour: float
  source: str
  date: str


# HBM in GiB: the pages say 'GB' or 'GiB', and libtpu's limit for a 16 GiB v5e is 15.75 GiB.
CHIPS = {
  'v4': Chip('TPU v4', 275e12, 32 * GiB, 1200e9, 'https://cloud.google.com/tpu/docs/v4'),
  'v5e': Chip(
    'TPU v5e',
    197e12,
    16 * GiB,
    819e9,
    'https://cloud.google.com/tpu/docs/v5e',
    ici_bytes_per_s=400e9,
  ),
  'v5p': Chip(
    'TPU v5p',
    459e12,
    95 * GiB,
    2765e9,
    'https://cloud.google.com/tpu/docs/v5p',
    ici_bytes_per_s=1200e9,
  ),
  'v6e': Chip('TPU v6e', 918e12, 32 * GiB, 1638e9, 'https://cloud.google.com/tpu/docs/v6e'),
  'tpu7x': Chip('TPU7x', 2307e12, 192 * GiB, 7380e9, 'https://cloud.google.com/tpu/docs/tpu7x', 2),
}
# The one price table (on-demand, USD per chip-hour, the lowest region seen); None where no
# public list price was found (TPU7x is sold by reservation; v4's page was not checked):
# the pre-flight then asks for --price. Prices change: check the page before quoting.
_PRICING = 'https://cloud.google.com/tpu/pricing'
PRICES = {
  'v4': None,
  'v5e': Price(1.20, _PRICING, '2026-12-03'),
  'v5p': Price(4.20, _PRICING, '2026-12-03'),
  'v6e': Price(2.70, _PRICING, '2026-12-03'),
  'tpu7x': None,
}
