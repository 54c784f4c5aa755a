"""Numerical parity of the Flax PSPNet with the official layout in PyTorch (interop.torch_pspnet).

Weights are random, BatchNorm affine parameters random and running statistics calibrated on
random data then perturbed, so a converter that ignored or mis-mapped any of them would fail.
The torch model is converted with psp_jax.convert and both are compared stage by stage.

float32 bound 1e-5 (relative L2): PyTorch itself, NCHW vs channels_last (summation order
alone), differs by 3.4e-6 on these PSPNet-101 weights at 473x473, and the Flax model is no
further from a float64 run than that. float64 proves the structure exactly (agreement
~1e-14, bound 1e-10). Each measured error is printed (`pytest -s`).
"""

import copy
import functools

import jax
import jax.numpy as jnp
import optax
import pytest

torch = pytest.importorskip('torch')

from psp_jax.interop import semseg  # noqa: E402
from psp_jax.interop.torch_pspnet import TorchPSPNet  # noqa: E402

from torch_helpers import compare_eval, errors, flax_model, nhwc, randomize  # noqa: E402

pytestmark = pytest.mark.torch
F32_BOUND, F64_BOUND = 1e-5, 1e-10


@functools.cache
def official(depth: int) -> tuple[TorchPSPNet, dict, dict]:
  """(calibrated torch PSPNet-depth, its converted float32 variables, model config)."""
  model = randomize(TorchPSPNet(150, depth=depth), seed=depth)
  variables, config = semseg.from_torch_state_dict(model.state_dict())
  return model, variables, config


@pytest.mark.slow
@pytest.mark.parametrize('depth', [50, 101])
@pytest.mark.parametrize('hw', [(473, 473), (377, 505)], ids=['473x473', '377x505'])
def test_eval_float32(depth, hw):
  torch_model, variables, config = official(depth)
  x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(hw[1]))
  compare_eval(torch_model, variables, flax_model(config), x, F32_BOUND, f'f32 PSPNet-{depth} {hw}')


@pytest.mark.slow
@pytest.mark.parametrize('depth', [50, 101])
def test_eval_float64(depth):
  torch_model, _, config = official(depth)
  model64 = copy.deepcopy(torch_model).double()
  x = torch.randn(1, 3, 97, 121, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
  with jax.enable_x64(True):
    variables, _ = semseg.from_torch_state_dict(model64.state_dict(), config)
    model = flax_model(config, jnp.float64)
    compare_eval(model64, variables, model, x, F64_BOUND, f'f64 PSPNet-{depth} 97x121')


def masked_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """nn.CrossEntropyLoss(ignore_index=255): mean over labelled pixels. [B, H, W, K], [B, H, W]."""
  mask = labels != 255
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
  return jnp.sum(ce * mask) / jnp.sum(mask)


def compare_train_step(
  torch_model, config, x, labels, dtype, bound, label, atol=1e-14, **overrides
):
  """Loss, gradients of main + 0.4 aux for every parameter, updated running stats."""
  torch_model = copy.deepcopy(torch_model)
  if dtype == jnp.float64:
    torch_model.double()
  variables, _ = semseg.from_torch_state_dict(torch_model.state_dict(), config)
  for m in torch_model.modules():
    if isinstance(m, torch.nn.Dropout2d):
      m.p = 0.0  # masks cannot match across frameworks; dropout itself is tested elsewhere
  torch_model.train()
  main, aux = torch_model(x)
  criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
  t_main, t_aux = criterion(main, labels), criterion(aux, labels)
  (t_main + 0.4 * t_aux).backward()

  model = flax_model(config, dtype, dropout_rate=0.0, **overrides)
  y = jnp.asarray(labels.numpy())

  @jax.jit
  def step(params, batch_stats, images):
    def loss_fn(params):
      (logits, aux_logits), updates = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        images,
        train=True,
        rngs={'dropout': jax.random.key(0)},
        mutable=['batch_stats'],
      )
      main, aux = masked_ce(logits, y), masked_ce(aux_logits, y)
      return main + 0.4 * aux, (main, aux, updates['batch_stats'])

    return jax.grad(loss_fn, has_aux=True)(params)

  grads, (j_main, j_aux, new_stats) = step(
    variables['params'], variables['batch_stats'], jnp.asarray(nhwc(x))
  )
  results = {'loss main': errors(j_main, t_main.item()), 'loss aux': errors(j_aux, t_aux.item())}
  named = semseg.to_torch_names({'params': grads, 'batch_stats': new_stats})
  torch_named = {k: p.grad for k, p in torch_model.named_parameters()}
  torch_named.update({k: b for k, b in torch_model.named_buffers() if 'running' in k})
  assert named.keys() == torch_named.keys()
  per_key = {k: errors(named[k], torch_named[k].numpy()) for k in named}
  for kind, test in (
    ('grad', lambda k: 'running' not in k),
    ('running stats', lambda k: 'running' in k),
  ):
    keys = [k for k in per_key if test(k)]
    worst = max(keys, key=lambda k: per_key[k][0])
    results[f'{kind} (worst: {worst})'] = per_key[worst]
  for name, (rel, max_abs) in results.items():
    print(f'PARITY {label} {name}: rel L2 {rel:.2e}, max abs {max_abs:.2e}')
  # The PPM bin-1 branch normalises 2 values per channel (batch 2, 1x1): its output is +-1
  # whatever the input, so its conv's gradient is ~1e-5 of the others and only its absolute
  # error is meaningful; hence the absolute floor `atol` beside the relative bound.
  bad = {k: v for k, v in per_key.items() if not (v[0] <= bound or v[1] <= atol)}
  bad.update({k: v for k, v in results.items() if not v[0] <= bound})
  assert not bad, f'{label}: beyond rel L2 {bound} (and max abs {atol}): {bad}'


def _train_batch(hw: tuple[int, int], classes: int, dtype) -> tuple:
  gen = torch.Generator().manual_seed(3)
  x = torch.randn(2, 3, *hw, generator=gen, dtype=dtype)
  labels = torch.randint(0, classes, (2, *hw), generator=gen)
  labels[torch.rand(labels.shape, generator=gen) < 0.2] = 255
  return x, labels


@pytest.mark.slow
def test_train_step_float64_pspnet50():
  torch_model, _, config = official(50)
  x, labels = _train_batch((65, 65), 150, torch.float64)
  with jax.enable_x64(True):
    compare_train_step(
      torch_model, config, x, labels, jnp.float64, F64_BOUND, 'f64 train PSPNet-50'
    )


TINY_VARIANTS = {
  'r18-classic-max-os16': dict(depth=18, stem='classic', pool='max', output_stride=16),
  'r34-bin1-noreduce-os32': dict(depth=34, bins=(1,), reduce_dim=False, output_stride=32),
  'r50-noppm': dict(depth=50, use_ppm=False),
}


@pytest.mark.slow  # 17-95 s each on 2 cores: float64 train-step compiles.
@pytest.mark.parametrize('variant', list(TINY_VARIANTS))
def test_tiny_variants_float64(variant):
  """Every constructor option, at widths of a few channels and an odd, non-8k+1 size."""
  kwargs = dict(num_classes=7, width=4, head_channels=8, aux_channels=8, **TINY_VARIANTS[variant])
  torch_model = randomize(TorchPSPNet(**kwargs), seed=1, calib_hw=41).double()
  x, labels = _train_batch((58, 75), 7, torch.float64)
  with jax.enable_x64(True):
    variables, config = semseg.from_torch_state_dict(torch_model.state_dict(), kwargs)
    config.update(kwargs)
    model = flax_model(config, jnp.float64)
    compare_eval(torch_model, variables, model, x[:1], F64_BOUND, f'f64 tiny {variant}')
    compare_train_step(
      torch_model, config, x, labels, jnp.float64, F64_BOUND, f'f64 tiny {variant}'
    )
