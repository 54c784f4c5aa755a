"""interop.torch_pspnet: the official state_dict layout exactly, and the forward contract."""

import pathlib

import pytest

torch = pytest.importorskip('torch')

from psp_jax.interop.torch_pspnet import TorchPSPNet, build  # noqa: E402

pytestmark = pytest.mark.torch
DATA = pathlib.Path(__file__).parent / 'data'


def _official_keys(depth: int) -> list[str]:
  lines = (DATA / f'semseg_pspnet{depth}_keys.txt').read_text().splitlines()
  return [line for line in lines if line.strip()]


@pytest.mark.parametrize('depth', [50, 101])
def test_state_dict_keys_and_shapes_equal_official(depth):
  with torch.device('meta'):
    model = TorchPSPNet(150, depth=depth)
  got = [f'{k} {tuple(v.shape)}' for k, v in model.state_dict().items()]
  assert got == _official_keys(depth)  # same keys, shapes and order


def test_parameter_counts_match_reference():
  with torch.device('meta'):
    m50, m101 = TorchPSPNet(150, depth=50), TorchPSPNet(150, depth=101)
  count = lambda m: sum(p.numel() for p in m.parameters())
  assert count(m50) == 49_180_908
  assert count(m101) == 68_173_036
  per_module = {n: count(getattr(m50, n)) for n in ('layer0', 'layer1', 'layer2', 'layer3')}
  per_module.update({n: count(getattr(m50, n)) for n in ('layer4', 'ppm', 'cls', 'aux')})
  assert per_module == dict(
    layer0=112_832,
    layer1=236_288,
    layer2=1_219_584,
    layer3=7_098_368,
    layer4=14_964_736,
    ppm=4_198_400,
    cls=18_952_342,
    aux=2_398_358,
  )


@pytest.mark.parametrize('depth', [18, 50])
def test_forward_shapes_any_size(depth):
  torch.manual_seed(0)
  model = TorchPSPNet(5, depth=depth, width=8, head_channels=16, aux_channels=8).eval()
  x = torch.randn(2, 3, 37, 50)  # not 8k+1: the original would assert
  with torch.no_grad():
    logits = model(x)
    acts = model(x, return_intermediates=True)
  assert logits.shape == (2, 5, 37, 50)
  expansion = 4 if depth == 50 else 1
  assert acts['layer0'].shape == (2, 16, 10, 13)
  assert acts['layer4'].shape == (2, 64 * expansion, 5, 7)  # stride 8, dilated
  assert acts['ppm'].shape == (2, 2 * 64 * expansion, 5, 7)  # input + 4 x (C / 4)
  assert acts['cls'].shape == (2, 5, 5, 7)
  assert 'aux' not in acts
  torch.testing.assert_close(acts['logits'], logits)

  model.train()
  main, aux = model(x)
  assert main.shape == aux.shape == (2, 5, 37, 50)


def test_upsampling_is_align_corners():
  model = TorchPSPNet(3, width=8, head_channels=8, aux_channels=8).eval()
  x = torch.randn(1, 3, 33, 41)
  with torch.no_grad():
    acts = model(x, return_intermediates=True)
  # align_corners=True keeps the corner values of the 1/8 map exactly.
  torch.testing.assert_close(acts['logits'][..., 0, 0], acts['cls'][..., 0, 0])
  torch.testing.assert_close(acts['logits'][..., -1, -1], acts['cls'][..., -1, -1])


def test_variants_and_build():
  model = build(
    dict(num_classes=4, depth=34, stem='classic', width=8, bins=[1], use_ppm=True, dtype='x')
  )
  keys = model.state_dict().keys()
  assert 'layer0.0.weight' in keys and 'layer0.3.weight' not in keys
  assert model.layer0[0].kernel_size == (7, 7)
  assert 'ppm.features.0.1.weight' in keys and 'ppm.features.1.1.weight' not in keys
  no_ppm = TorchPSPNet(4, width=8, use_ppm=False)
  assert not any(k.startswith('ppm') for k in no_ppm.state_dict())
  assert no_ppm.cls[0].in_channels == 256
  os16 = TorchPSPNet(4, width=8, output_stride=16)
  assert os16.layer3[0].conv2.stride == (2, 2) and os16.layer4[0].conv2.dilation == (2, 2)
  with pytest.raises(ValueError, match='depth=42'):
    TorchPSPNet(4, depth=42)
