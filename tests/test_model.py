"""The Flax PSPNet: sizes, names, shapes, train/eval behaviour, BatchNorm and Dropout2d."""

import functools
import math
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from psp_jax.models import PSPNet, PyramidPooling, ResNet, codec
from psp_jax.models.layers import TORCH_DEFAULT_KERNEL_INIT, BatchNorm, Conv
from psp_jax.models.pspnet import Head

DATA = pathlib.Path(__file__).parent / 'data'
NUM_CLASSES = 5
# depth 18, width 8: layer4 has 64 channels, the PPM 64 + 4 * 16 = 128.
TINY = dict(num_classes=NUM_CLASSES, depth=18, width=8, head_channels=16, aux_channels=8)
STAGES = ('layer0', 'layer1', 'layer2', 'layer3', 'layer4')


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_variables(model, shape=(1, 33, 33, 3), train=False):
  """Shapes of model.init's variables, traced only (no compile, no random numbers)."""
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(
    lambda x: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, train=train
    ),
    images,
  )


def abstract_intermediates(model, shape, train=False):
  """Shapes of the sown intermediates of one forward pass (traced only)."""
  variables = abstract_variables(model, shape)
  images = jax.ShapeDtypeStruct(shape, jnp.float32)

  def run(v, x):
    mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
    return model.apply(v, x, train=train, rngs={'dropout': jax.random.key(0)}, mutable=mutable)

  out, state = jax.eval_shape(run, variables, images)
  return out, {k: v[0].shape for k, v in state['intermediates'].items()}


def numpy_variables(shapes, seed=0):
  """Random variables of the shapes in `shapes`, filled by numpy.

  (XLA's random-number kernels compile slowly on CPU.) Kernels He-normal, biases small,
  BatchNorm scale/bias/statistics randomised so that eval mode is a real affine transform.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / math.prod(leaf.shape[:-1]))
    elif name == 'scale':
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    elif name == 'var':
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:  # bias, mean
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Full-size structure: parameter counts and the official checkpoint's names (traced only).


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
  """The official state_dict name of a Flax leaf, written from REFERENCE section 2."""
  *module, leaf = path
  match module:
    case ['backbone', 'layer0', m]:
      prefix = 'layer0.' + dict(conv1='0', bn1='1', conv2='3', bn2='4', conv3='6', bn3='7')[m]
    case ['backbone', stage, block, 'downsample', m]:
      prefix = f'{stage}.{block}.downsample.' + {'conv': '0', 'bn': '1'}[m]
    case ['backbone', stage, block, m]:
      prefix = f'{stage}.{block}.{m}'
    case ['ppm', k, m]:
      prefix = f'ppm.features.{k}.' + {'conv': '1', 'bn': '2'}[m]
    case [head, m]:
      prefix = f'{head}.' + {'conv1': '0', 'bn1': '1', 'conv2': '4'}[m]
  names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
  names.update(mean='running_mean', var='running_var')
  return f'{prefix}.{names[leaf]}'


def _torch_shapes(variables) -> dict[str, tuple[int, ...]]:
  out = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in flax.traverse_util.flatten_dict(variables[collection]).items():
      shape = tuple(leaf.shape)
      if path[-1] == 'kernel':
        shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
      out[_torch_name(collection, path)] = shape
  return out


def _official_shapes(depth: int) -> dict[str, tuple[int, ...]]:
  out = {}
  for line in (DATA / f'semseg_pspnet{depth}_keys.txt').read_text().splitlines():
    name, shape = line.split(' ', 1)
    if not name.endswith('num_batches_tracked'):
      out[name] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
  return out


@pytest.mark.slow
def test_pspnet50_parameter_counts_and_official_names():
  variables = abstract_variables(PSPNet(num_classes=150, depth=50))
  params = variables['params']
  assert count(params) == 49_180_908
  per_module = {k: count(v) for k, v in params['backbone'].items()}
  per_module.update({k: count(v) for k, v in params.items() if k != 'backbone'})
  assert per_module == {
    'layer0': 112_832,
    'layer1': 236_288,
    'layer2': 1_219_584,
    'layer3': 7_098_368,
    'layer4': 14_964_736,
    'ppm': 4_198_400,
    'cls': 18_952_342,
    'aux': 2_398_358,
  }
  # Every leaf has an official name with the official shape, and none is missing.
  assert _torch_shapes(variables) == _official_shapes(50)


@pytest.mark.slow
def test_pspnet101_parameter_count_and_official_names():
  variables = abstract_variables(PSPNet(num_classes=150, depth=101))
  assert count(variables['params']) == 68_173_036
  assert _torch_shapes(variables) == _official_shapes(101)


def test_classic_resnet_counts_equal_torchvision_without_fc():
  # torchvision resnetN parameter counts minus fc (512 * 1000 + 1000 or 2048 * 1000 + 1000).
  expected = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160}
  for depth, n in expected.items():
    variables = abstract_variables(ResNet(depth, stem='classic', output_stride=32))
    assert count(variables['params']) == n, depth
  layer0 = abstract_variables(ResNet(50, stem='classic'))['params']['layer0']
  assert jax.tree.map(lambda x: x.shape, layer0) == {
    'conv1': {'kernel': (7, 7, 3, 64)},
    'bn1': {'scale': (64,), 'bias': (64,)},
  }


# ---------------------------------------------------------------------------------------------
# Tiny models: shapes from tracing, behaviour from a few compiled runs shared by the tests.


def test_feature_sizes_per_output_stride():
  # 33 -> stem 17 -> pool 9 -> layer2 5 -> 3 -> 2; 30x45 -> 15x23 -> 8x12 -> 4x6 -> 2x3 -> 1x2.
  expect = {
    (33, 33): {8: ((5, 5), (5, 5)), 16: ((3, 3), (3, 3)), 32: ((3, 3), (2, 2))},
    (30, 45): {8: ((4, 6), (4, 6)), 16: ((2, 3), (2, 3)), 32: ((2, 3), (1, 2))},
  }
  for (h, w), per_stride in expect.items():
    for stride, (l3, l4) in per_stride.items():
      model = PSPNet(**TINY, output_stride=stride)
      logits, inter = abstract_intermediates(model, (2, h, w, 3))
      assert logits.shape == (2, h, w, NUM_CLASSES)
      assert inter['layer2'][1:3] == ((h + 7) // 8, (w + 7) // 8)
      assert inter['layer3'][1:3] == l3, (h, w, stride)
      assert inter['layer4'][1:3] == l4, (h, w, stride)
      assert inter['cls'][1:3] == l4


def test_min_input_side_is_the_first_with_a_layer4_cell_per_finest_bin():
  assert codec.min_input_side({}) == 41  # stride 8, bins (1, 2, 3, 6)
  assert codec.min_input_side({'output_stride': 16, 'bins': [1, 2, 6]}) == 81
  assert codec.min_input_side({'output_stride': 8, 'use_ppm': False}) == 1
  for stride in (8, 16, 32):
    side = codec.min_input_side({'output_stride': stride})
    for s in (side - 1, side):
      _, inter = abstract_intermediates(PSPNet(**TINY, output_stride=stride), (1, s, s, 3))
      assert inter['layer4'][1:3] == (codec.feature_side(s, stride),) * 2
    assert codec.feature_side(side - 1, stride) == 5 and codec.feature_side(side, stride) == 6


def test_any_input_size_gives_input_sized_logits():
  for h, w in [(33, 33), (30, 45), (1, 1), (8, 100), (65, 34)]:
    logits, inter = abstract_intermediates(PSPNet(**TINY), (1, h, w, 3))
    assert logits.shape == (1, h, w, NUM_CLASSES)
    assert logits.dtype == jnp.float32
  (main, aux), inter = abstract_intermediates(PSPNet(**TINY), (2, 30, 45, 3), train=True)
  assert main.shape == aux.shape == (2, 30, 45, NUM_CLASSES)
  assert inter['aux'] == (2, 4, 6, NUM_CLASSES)


def test_channel_counts_of_ablations():
  def channels(**kw):
    _, inter = abstract_intermediates(PSPNet(**{**TINY, **kw}), (1, 33, 33, 3))
    return {k: v[-1] for k, v in inter.items()}

  # Deep stem gives 2 * width, layer1..4 width * (1, 2, 4, 8) for basic blocks.
  base = dict(layer0=16, layer1=8, layer2=16, layer3=32, layer4=64, cls=NUM_CLASSES)
  assert channels() == {**base, 'ppm': 64 + 4 * 16}
  assert channels(reduce_dim=False) == {**base, 'ppm': 64 + 4 * 64}
  assert channels(bins=(1,)) == {**base, 'ppm': 64 + 64}
  assert channels(use_ppm=False) == base
  assert channels(depth=50, stem='classic') == {
    **base,
    **dict(layer0=8, layer1=32, layer2=64, layer3=128, layer4=256, ppm=256 + 4 * 64),
  }
  params = abstract_variables(PSPNet(**TINY, use_ppm=False))['params']
  assert 'ppm' not in params
  assert params['cls']['conv1']['kernel'].shape == (3, 3, 64, 16)
  params = abstract_variables(PSPNet(**TINY, reduce_dim=False, pool='max'))['params']
  assert params['ppm']['3']['conv']['kernel'].shape == (1, 1, 64, 64)
  assert params['cls']['conv1']['kernel'].shape == (3, 3, 320, 16)


def test_aux_parameters_exist_after_eval_init():
  variables = abstract_variables(PSPNet(**TINY), train=False)
  assert set(variables['params']) == {'backbone', 'ppm', 'cls', 'aux'}
  assert variables['params']['aux']['conv1']['kernel'].shape == (3, 3, 32, 8)
  assert variables['params']['aux']['conv2']['bias'].shape == (NUM_CLASSES,)
  assert 'bias' not in variables['params']['cls']['conv1']
  assert variables['batch_stats']['aux']['bn1']['var'].shape == (8,)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='NCHW'):
    abstract_variables(PSPNet(**TINY), shape=(1, 3, 33, 33))
  with pytest.raises(ValueError, match='depth'):
    abstract_variables(PSPNet(**{**TINY, 'depth': 42}))
  with pytest.raises(ValueError, match='output_stride'):
    abstract_variables(PSPNet(**TINY, output_stride=4))
  with pytest.raises(ValueError, match='pool'):
    abstract_variables(PSPNet(**TINY, pool='median'))
  with pytest.raises(ValueError, match='stem'):
    abstract_variables(PSPNet(**TINY, stem='wide'))


@pytest.fixture(scope='module')
def tiny():
  """A tiny PSPNet, its variables, a 2x33x33 batch and jitted eval/train applies."""
  model = PSPNet(**TINY)
  x = images((2, 33, 33, 3))
  variables = numpy_variables(abstract_variables(model, x.shape))

  @jax.jit
  def evaluate(v, x):
    return model.apply(v, x, train=False, mutable=['intermediates'])

  @jax.jit
  def train(v, x, key):
    return model.apply(
      v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats', 'intermediates']
    )

  return dict(model=model, variables=variables, x=x, evaluate=evaluate, train=train)


@pytest.fixture(scope='module')
def tiny_eval(tiny):
  return tiny['evaluate'](tiny['variables'], tiny['x'])


@pytest.fixture(scope='module')
def tiny_train(tiny):
  return [tiny['train'](tiny['variables'], tiny['x'], jax.random.key(k)) for k in (0, 1)]


def test_eval_logits_are_upsampled_cls_and_deterministic(tiny, tiny_eval):
  logits, state = tiny_eval
  inter = {k: v[0] for k, v in state['intermediates'].items()}
  assert set(inter) == {*STAGES, 'ppm', 'cls'}
  assert logits.shape == (2, 33, 33, NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  # align_corners=True at 5 -> 33 puts every 8th output pixel exactly on a cls pixel.
  np.testing.assert_allclose(logits[:, ::8, ::8], inter['cls'], rtol=1e-6, atol=1e-6)
  # The PPM output starts with its input, layer4.
  np.testing.assert_array_equal(inter['ppm'][..., :64], inter['layer4'])
  again, _ = tiny['evaluate'](tiny['variables'], tiny['x'])
  np.testing.assert_array_equal(logits, again)


def test_train_returns_main_and_aux_and_moves_every_running_stat(tiny, tiny_train):
  (main, aux), state = tiny_train[0]
  assert main.shape == aux.shape == (2, 33, 33, NUM_CLASSES)
  assert main.dtype == aux.dtype == jnp.float32
  assert state['intermediates']['aux'][0].shape == (2, 5, 5, NUM_CLASSES)
  old = flax.traverse_util.flatten_dict(tiny['variables']['batch_stats'])
  new = flax.traverse_util.flatten_dict(state['batch_stats'])
  assert old.keys() == new.keys() and len(new) == 2 * 29  # 29 BatchNorms in this model
  unchanged = [k for k in new if np.allclose(new[k], old[k])]
  assert not unchanged


def test_running_variance_is_unbiased(tiny, tiny_train):
  """ppm bin-1 BN: n = batch size 2, so torch's n/(n-1) doubles the batch variance."""
  _, state = tiny_train[0]
  layer4 = np.asarray(state['intermediates']['layer4'][0], np.float64)
  kernel = np.asarray(tiny['variables']['params']['ppm']['0']['conv']['kernel'], np.float64)
  z = layer4.mean(axis=(1, 2)) @ kernel[0, 0]  # [B, C]: pool to 1x1, conv1x1
  old = tiny['variables']['batch_stats']['ppm']['0']['bn']
  new = state['batch_stats']['ppm']['0']['bn']
  np.testing.assert_allclose(new['mean'], 0.9 * old['mean'] + 0.1 * z.mean(0), rtol=1e-5, atol=1e-6)
  want = 0.9 * old['var'] + 0.1 * z.var(0, ddof=1)
  np.testing.assert_allclose(new['var'], want, rtol=1e-5, atol=1e-6)
  biased = 0.9 * old['var'] + 0.1 * z.var(0, ddof=0)
  assert np.abs(np.asarray(new['var']) - biased).max() > 1e-3


def test_dropout_depends_on_rng_and_eval_needs_none(tiny, tiny_train, tiny_eval):
  (main0, aux0), state0 = tiny_train[0]
  (main1, aux1), state1 = tiny_train[1]
  # Same batch statistics (dropout comes after the BNs), different dropout masks.
  flat0 = jax.tree.leaves(state0['batch_stats'])
  for a, b in zip(flat0, jax.tree.leaves(state1['batch_stats']), strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.abs(main0 - main1).max() > 1e-3
  assert np.abs(aux0 - aux1).max() > 1e-3


def test_dropout2d_zeros_whole_channels():
  """The head's Dropout2d: per (image, channel) all of H x W is kept (x 1/(1-p)) or zeroed."""
  conv = functools.partial(Conv, kernel_init=TORCH_DEFAULT_KERNEL_INIT)
  head = Head(32, 3, 0.5, conv, BatchNorm)
  x = images((4, 6, 7, 8))
  variables = head.init(jax.random.key(0), x, train=False)
  _, state = head.apply(
    variables,
    x,
    train=True,
    rngs={'dropout': jax.random.key(3)},
    mutable=['batch_stats', 'intermediates'],
    capture_intermediates=True,
  )
  inter = state['intermediates']
  before = np.maximum(np.asarray(inter['bn1']['__call__'][0]), 0.0)  # ReLU of bn1
  after = np.asarray(inter['dropout']['__call__'][0])
  kept = np.all(np.isclose(after, 2.0 * before, rtol=1e-6, atol=1e-7), axis=(1, 2))  # [B, C]
  dropped = np.all(after == 0.0, axis=(1, 2)) & np.any(before > 0, axis=(1, 2))
  assert np.all(kept | dropped)
  assert 0.2 < dropped.mean() < 0.8 and kept.mean() > 0.2
  # Eval: the dropout layer is the identity and no rng is needed.
  _, state = head.apply(
    variables, x, train=False, mutable=['intermediates'], capture_intermediates=True
  )
  inter = state['intermediates']
  np.testing.assert_array_equal(
    inter['dropout']['__call__'][0], np.maximum(inter['bn1']['__call__'][0], 0.0)
  )


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny, tiny_eval):
  model = PSPNet(**TINY, dtype=jnp.bfloat16)
  shapes = abstract_variables(model)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))(
    tiny['variables'], tiny['x']
  )
  assert state['intermediates']['cls'][0].dtype == jnp.bfloat16
  assert state['intermediates']['layer3'][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  reference = np.asarray(tiny_eval[0])
  error = np.abs(np.asarray(logits) - reference).max() / np.abs(reference).max()
  assert error < 0.05, error


def test_batchnorm_matches_numpy_and_raises_on_one_value():
  bn = BatchNorm(momentum=0.9, epsilon=1e-5)
  x = images((3, 4, 5, 6)) * 3.0 + 2.0
  variables = bn.init(jax.random.key(0), x, train=False)
  assert set(variables['batch_stats']) == {'mean', 'var'}
  assert set(variables['params']) == {'scale', 'bias'}
  y, state = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  xn = np.asarray(x, np.float64).reshape(-1, 6)
  mean, var = xn.mean(0), xn.var(0)
  want = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['var'], 0.9 + 0.1 * var * 60 / 59, rtol=1e-5)
  # Eval uses the running statistics; bfloat16 inputs give bfloat16 outputs.
  y_eval = bn.apply(state | {'params': variables['params']}, x.astype(jnp.bfloat16), train=False)
  assert y_eval.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='more than 1 value per channel'):
    bn.apply(variables, x[:1, :1, :1], train=True, mutable=['batch_stats'])


@pytest.mark.torch
def test_batchnorm_equals_torch_batchnorm2d_over_steps():
  torch = pytest.importorskip('torch')
  bn = BatchNorm(momentum=0.9, epsilon=1e-5)
  ref = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
  with torch.no_grad():
    ref.weight.uniform_(0.5, 1.5)
    ref.bias.uniform_(-0.5, 0.5)
  variables = {
    'params': {'scale': jnp.asarray(ref.weight.detach()), 'bias': jnp.asarray(ref.bias.detach())},
    'batch_stats': {'mean': jnp.zeros(6), 'var': jnp.ones(6)},
  }
  for step in range(3):
    x = np.asarray(images((2, 3, 4, 6), seed=step)) * 2.0 + step
    y, state = bn.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
    variables = {**variables, **state}
    want = ref.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    np.testing.assert_allclose(y, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['mean'], ref.running_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state['batch_stats']['var'], ref.running_var, rtol=1e-5, atol=1e-6)
  y = bn.apply(variables, jnp.asarray(x), train=False)
  want = ref.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
  np.testing.assert_allclose(y, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_batchnorm_axis_name_in_shard_map_equals_global(num_devices):
  """Inside shard_map, axis_name gives the statistics of the whole batch (SyncBN)."""
  mesh = jax.make_mesh((num_devices,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  x = images((2 * num_devices, 3, 3, 4)) * 2.0 + 1.0
  variables = BatchNorm().init(jax.random.key(0), x, train=False)
  want, want_state = BatchNorm().apply(variables, x, train=True, mutable=['batch_stats'])

  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), P('data')), out_specs=(P('data'), P())
  )
  def synced(v, x):
    return BatchNorm(axis_name='data').apply(v, x, train=True, mutable=['batch_stats'])

  got, state = synced(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _batchnorm_reference_loss(variables, x, w):
  """sum(w * BatchNorm(x)) in training mode, written out for JAX to differentiate."""
  scale, bias = variables['params']['scale'], variables['params']['bias']
  mean = x.mean((0, 1, 2))
  var = jnp.square(x - mean).mean((0, 1, 2))
  return jnp.sum(w * ((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias))


@pytest.mark.parametrize('offset', [0.0, 30.0])
def test_batchnorm_gradient_equals_autodiff_plain_and_in_shard_map(num_devices, offset):
  """BatchNorm's written-out backward equals JAX's derivative of the formula, in float64.

  Plain and inside shard_map with axis_name (the gradient of the global batch); inputs
  centred on 0 and on 30 standard deviations (the backward subtracts mean * sum(dy)).
  """
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(offset, 2.0, (2 * num_devices, 3, 3, 4)), jnp.float64)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float64)
    bn = BatchNorm(param_dtype=jnp.float64)
    variables = bn.init(jax.random.key(0), x, train=False)
    params = {'scale': jnp.asarray(rng.normal(1, 0.3, 4)), 'bias': jnp.asarray(rng.normal(size=4))}
    variables = {**variables, 'params': params}
    want = jax.grad(_batchnorm_reference_loss, argnums=(0, 1))(variables, x, w)

    def loss(bn, v, x, w):
      return jnp.sum(w * bn.apply(v, x, train=True, mutable=['batch_stats'])[0])

    got = jax.jit(jax.grad(functools.partial(loss, bn), argnums=(0, 1)))(variables, x, w)
    mesh = jax.make_mesh((num_devices,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    synced_bn = BatchNorm(axis_name='data', param_dtype=jnp.float64)
    synced = jax.shard_map(
      jax.grad(functools.partial(loss, synced_bn), argnums=(0, 1)),
      mesh=mesh,
      in_specs=(P(), P('data'), P('data')),
      out_specs=(P(), P('data')),
    )(variables, x, w)
  for grads in (got, synced):
    np.testing.assert_allclose(grads[1], want[1], rtol=1e-9, atol=1e-11)
    for key in ('scale', 'bias'):
      np.testing.assert_allclose(
        grads[0]['params'][key], want[0]['params'][key], rtol=1e-9, atol=1e-11
      )


@pytest.mark.slow  # 13-15 s on 2 cores: both pools, eval and train.
def test_pyramid_pooling_max_and_avg_bin1_branch():
  """Bin 1: pool to 1x1, conv, BN (running stats), ReLU, broadcast over the map."""
  x = images((2, 7, 5, 8))
  for pool, reduce in (('max', np.max), ('avg', np.mean)):
    ppm = PyramidPooling(bins=(1, 2, 3, 6), pool=pool)
    shapes = jax.eval_shape(functools.partial(ppm.init, jax.random.key(0), train=False), x)
    variables = numpy_variables(shapes)
    out = np.asarray(ppm.apply(variables, x, train=False))
    assert out.shape == (2, 7, 5, 8 + 4 * 2)
    np.testing.assert_array_equal(out[..., :8], x)
    p = variables['params']['0']
    s = variables['batch_stats']['0']['bn']
    z = reduce(np.asarray(x), axis=(1, 2)) @ np.asarray(p['conv']['kernel'][0, 0])
    z = (z - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['bn']['scale'] + p['bn']['bias']
    np.testing.assert_allclose(
      out[..., 8:10],
      np.broadcast_to(np.maximum(z, 0)[:, None, None], (2, 7, 5, 2)),
      rtol=1e-5,
      atol=1e-5,
    )


def test_initialisers_follow_the_original():
  """Backbone convs: kaiming_normal_(fan_out); head convs and biases: nn.Conv2d's defaults."""
  x = jnp.zeros((1, 5, 5, 32))
  kernel = Conv(64, 3).init(jax.random.key(0), x)['params']['kernel']
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (64 * 9)), rtol=0.05)
  head = Conv(48, 3, use_bias=True, kernel_init=TORCH_DEFAULT_KERNEL_INIT)
  params = head.init(jax.random.key(1), x)['params']
  bound = 1.0 / np.sqrt(32 * 9)
  for leaf in (params['kernel'], params['bias']):
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound
