"""What the PyTorch parity modules share (test_parity, test_mmseg): calibrated random torch
models, the Flax model of a converted config, and the stage-by-stage comparison in eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from psp_jax.interop.torch_pspnet import BasicBlock, Bottleneck, TorchPSPNet  # noqa: E402
from psp_jax.models import PSPNet  # noqa: E402

STAGES = ('layer0', 'layer1', 'layer2', 'layer3', 'layer4', 'ppm', 'cls')


def randomize(model: TorchPSPNet, seed: int, calib_hw: int = 65) -> TorchPSPNet:
  """Random He-scaled convs, random BN affine params and realistic, perturbed running stats.

  The last BN of each residual branch gets gammas in [0.1, 0.3], as in trained ResNets. With
  branches as large as the trunk (gammas ~U(0.5, 1.5)) every block doubles the variance and
  float32 rounding compounds: PyTorch alone, NCHW vs channels_last, then differs by relative
  L2 2.7e-5 at 233x233 for PSPNet-50, above the 1e-5 bound (the Flax model: 2.5e-5 from
  PyTorch, 2.2e-5 from float64, PyTorch NCHW 1.6e-5 from float64).
  """
  gen = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  branch_ends = [m.bn3 for m in model.modules() if isinstance(m, Bottleneck)]
  branch_ends += [m.bn2 for m in model.modules() if isinstance(m, BasicBlock)]
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
        if m.bias is not None:
          m.bias.uniform_(-0.5, 0.5, generator=gen)
    for m in bns:
      m.weight.uniform_(0.5, 1.5, generator=gen)
      m.bias.uniform_(-0.3, 0.3, generator=gen)
      m.momentum = 1.0  # the running stats become this batch's statistics
    for m in branch_ends:
      m.weight.uniform_(0.1, 0.3, generator=gen)
    model.train()
    # Images that differ in brightness and contrast, so that image-level statistics (the
    # PPM's bin-1 branch) have a realistic spread rather than that of noise images.
    x = torch.randn(4, 3, calib_hw, calib_hw, generator=gen)
    x = x * torch.rand(4, 1, 1, 1, generator=gen) * 2 + torch.randn(4, 3, 1, 1, generator=gen)
    model(x)
    for m in bns:
      m.momentum = 0.1
      std = m.running_var.sqrt()
      m.running_mean.add_(0.2 * std * torch.randn(m.running_mean.shape, generator=gen))
      m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.6, 1.6, generator=gen))
      m.num_batches_tracked.fill_(123)
  return model.eval()


def flax_model(config: dict, dtype=jnp.float32, **overrides) -> PSPNet:
  kwargs = {k: v for k, v in config.items() if k != 'dtype'}
  kwargs.update(bins=tuple(kwargs['bins']), **overrides)
  return PSPNet(**kwargs, dtype=dtype, param_dtype=dtype)


def errors(got, want) -> tuple[float, float]:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
  return rel, float(np.abs(got - want).max())


def nhwc(t: 'torch.Tensor') -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def eval_fn(model: PSPNet):
  """Compiled (logits, {stage: activation}) of model in eval mode."""

  @jax.jit
  def run(variables, images):
    logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    return logits, {k: v[0] for k, v in state['intermediates'].items()}

  return run


def compare_eval(torch_model, variables, model, x: 'torch.Tensor', bound: float, label: str):
  with torch.no_grad():
    want = torch_model.eval()(x, return_intermediates=True)
  logits, acts = eval_fn(model)(variables, jnp.asarray(nhwc(x)))
  worst = {}
  names = [n for n in (*STAGES, 'logits') if n in want]  # no 'ppm' when use_ppm=False
  assert set(names) - {'logits'} == set(acts) - {'aux'}
  for name in names:
    got = logits if name == 'logits' else acts[name]
    rel, max_abs = worst[name] = errors(got, nhwc(want[name]))
    print(f'PARITY {label} {name}: rel L2 {rel:.2e}, max abs {max_abs:.2e}')
  bad = {k: v for k, v in worst.items() if not v[0] <= bound}
  assert not bad, f'{label}: beyond rel L2 {bound}: {bad}'
