"""Serving export (psp_jax.export, psp_jax.serving): each format against the in-process model.

A tiny PSPNet (width 8, 65x65) in StableHLO, SavedModel and ONNX, each run by its own
runtime; the standalone runner without psp_jax; predict --exported; the refusals of the
command line; and one full-size PSPNet-50 in all three formats (slow).
"""

import ast
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from psp_jax import digests, weights
from psp_jax.inference import planning
from psp_jax.models import PSPNet
from psp_jax.serving import (
  artifact,
  contract,
  deps,
  exporter,
  formats,
  onnx_graph,
  parity,
  runner,
)

from helpers import ROOT, random_variables, refused

pytestmark = pytest.mark.xdist_group('export')  # One worker: the artifacts are shared.
SIZE = (65, 65)  # layer4 9x9 at output stride 8: above the largest bin (6).
MODEL = dict(num_classes=21, depth=18, width=8, head_channels=16, aux_channels=8)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def needs(fmt: str) -> None:
  """Skips where the format's optional packages (the `export` extra) are not installed."""
  for module, _ in deps.WRITE[fmt]:
    pytest.importorskip(module, reason=f"--format {fmt}: pip install -e '.[export]'")


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A 21-class (VOC names) weights directory whose argmax spreads over several classes."""
  model = PSPNet(**MODEL)
  variables = random_variables(model, seed=3)
  probe = jnp.asarray(parity.images(2, SIZE, seed=9), jnp.float32) / 64.0 - 2.0
  mean = jax.jit(model.apply, static_argnames='train')(variables, probe, train=False)
  cls = dict(variables['params']['cls'])
  cls['conv2'] = dict(cls['conv2'], bias=cls['conv2']['bias'] - mean.mean(axis=(0, 1, 2)))
  variables = dict(variables, params=dict(variables['params'], cls=cls))
  path = tmp_path_factory.mktemp('export') / 'weights'
  weights.save_variables(path, variables, MODEL)
  return path


@pytest.fixture(scope='module')
def model(checkpoint):
  return exporter.Exporter.from_checkpoint(checkpoint)


@pytest.fixture(scope='module')
def exported(model, tmp_path_factory):
  """exported(fmt): the folder of the model's dynamic-batch logits export (made once)."""
  root, made = tmp_path_factory.mktemp('artifacts'), {}

  def get(fmt: str):
    if fmt not in made:
      needs(fmt)
      out = root / fmt
      meta = model.export(fmt, out, size=SIZE, batch=None, outputs='logits', log=print)
      made[fmt] = (out, meta)
    return made[fmt]

  return get


# StableHLO is the fast tier's; the TF and ONNX conversions take 20-25 s each on 2 cores.
CONVERSIONS = [
  f if f == 'stablehlo' else pytest.param(f, marks=pytest.mark.slow) for f in contract.FORMATS
]


@pytest.mark.parametrize('fmt', CONVERSIONS)
def test_each_format_gives_the_models_logits(fmt, model, exported):
  try:
    out, meta = exported(fmt)
  except deps.IncompatibleRuntimeError as e:  # Newest jax, older TensorFlow (.ci/py312.sh).
    assert f'jax {jax.__version__}' in str(e) and 'Nothing was written' in str(e)
    pytest.skip(f'this TensorFlow cannot run this jax SavedModel; the message was checked: {e}')
  assert meta['parity']['passed'] and meta['parity']['rel_l2'] <= parity.MAX_REL_L2
  written = json.loads((out / contract.METADATA_FILE).read_text())
  assert written['input'] == {
    'name': 'images',
    'shape': ['B', 65, 65, 3],
    'dtype': 'uint8',
    'layout': 'NHWC',
    'channels': 'RGB',
    'size': [65, 65],
    'batch': 'dynamic',
  }
  assert written['class_names'][15] == 'person' and len(written['palette']) == 21
  assert written['versions']['jax'] == jax.__version__ and written['format'] == fmt
  for name in contract.FILES[fmt]:
    assert (out / name).exists() or name == 'assets', name
  # Checked again here on other images and another batch size, not taken from the report.
  images = parity.images(3, SIZE, seed=5)
  got = artifact.open_artifact(out).run(images)
  reference = model.reference(images)
  assert got.shape == reference.shape and got.dtype == np.float32
  assert rel_l2(got, reference) <= parity.MAX_REL_L2
  agreement = np.mean(got.argmax(-1) == reference.argmax(-1))
  assert agreement >= parity.MIN_LABEL_AGREEMENT
  assert len(np.unique(reference.argmax(-1))) >= 3  # The labels test something.


@pytest.mark.parametrize(
  ('fmt', 'outputs'),
  [('stablehlo', 'probs'), pytest.param('onnx', 'labels', marks=pytest.mark.slow)],  # ONNX: 20 s
)
def test_labels_and_probabilities(fmt, outputs, model, tmp_path):
  needs(fmt)
  platforms = ('cpu', 'cuda') if fmt == 'stablehlo' else ('cpu',)
  meta = model.export(
    fmt, tmp_path / 'a', size=SIZE, batch=2, outputs=outputs, platforms=platforms, log=print
  )
  assert meta['output']['shape'][:3] == [2, 65, 65]
  if fmt == 'stablehlo':  # Lowered for a GPU too, without one.
    exported = jax.export.deserialize(bytearray((tmp_path / 'a' / 'model.stablehlo').read_bytes()))
    assert exported.platforms == ('cpu', 'cuda') and meta['platforms'] == ['cpu', 'cuda']
  images = parity.images(2, SIZE, seed=11)
  got = artifact.open_artifact(tmp_path / 'a').run(images)
  labels = model.reference(images).argmax(-1)
  if outputs == 'labels':
    assert got.dtype == np.int32 and got.shape == (2, 65, 65)
    assert np.mean(got == labels) >= parity.MIN_LABEL_AGREEMENT
  else:
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert rel_l2(got, np.asarray(jax.nn.softmax(model.reference(images)))) <= 1e-5
  # A fixed batch of 2 still serves 3 images (the last chunk padded).
  assert artifact.open_artifact(tmp_path / 'a').run(parity.images(3, SIZE)).shape[0] == 3


@pytest.mark.e2e
def test_runner_needs_only_jax_and_numpy(exported):
  """run_stablehlo.py, loaded from the artifact by path, imports nothing of psp_jax."""
  folder, _ = exported('stablehlo')
  tree = ast.parse((folder / 'run_stablehlo.py').read_text())
  imported = {
    a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
  }
  imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert imported <= {'json', 'os', 'sys', 'collections', 'typing', 'numpy', 'jax'}, imported
  image = parity.images(1, (40, 90), seed=2)[0]
  np.save(folder.parent / 'in.npy', image)
  code = (
    'import importlib.util, sys\n'
    f'spec = importlib.util.spec_from_file_location("r", {str(folder / "run_stablehlo.py")!r})\n'
    'r = importlib.util.module_from_spec(spec); spec.loader.exec_module(r)\n'
    f'r.main(["run", {str(folder)!r}, {str(folder.parent / "in.npy")!r}, '
    f'{str(folder.parent / "out.npy")!r}])\n'
    'ours = [m for m in sys.modules if m.split(".")[0] == "psp_jax"]\n'
    'assert not ours, ours\n'
  )
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, cwd='/', env=env, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  labels = np.load(folder.parent / 'out.npy')[0]
  assert labels.shape == (40, 90) and labels.dtype == np.int32
  # The same as the runner in this process, letterboxing included.
  np.testing.assert_array_equal(labels, runner.Runner.stablehlo(folder).predict(image))


def damaged_copy(exported, tmp_path):
  """A copy of the StableHLO artifact, and its model file."""
  folder, _ = exported('stablehlo')
  copy = tmp_path / 'copy'
  shutil.copytree(folder, copy)
  return copy, copy / runner.STABLEHLO_FILE


def test_serving_json_records_the_digest_of_every_file_and_opening_checks_it(exported, tmp_path):
  copy, model_file = damaged_copy(exported, tmp_path)
  recorded = json.loads((copy / contract.METADATA_FILE).read_text())['digests']
  assert sorted(recorded['files']) == ['model.stablehlo', 'run_stablehlo.py']
  assert recorded['files']['model.stablehlo'] == digests.of_file(model_file)
  artifact.open_artifact(copy)  # As written: opens.
  data = model_file.read_bytes()
  model_file.write_bytes(data[: len(data) // 2])
  with pytest.raises(artifact.DamagedArtifactError) as info:
    artifact.open_artifact(copy)
  assert str(info.value).startswith(f'--exported {copy}: model.stablehlo differs from its digest')
  assert 'Export it again' in str(info.value)
  model_file.unlink()
  with pytest.raises(artifact.DamagedArtifactError, match='model.stablehlo is missing'):
    artifact.open_artifact(copy)


def test_a_malformed_model_file_is_one_message_even_without_digests(exported, tmp_path, caplog):
  """An artifact exported before digests: what the runtime raises becomes one message."""
  copy, model_file = damaged_copy(exported, tmp_path)
  meta = json.loads((copy / contract.METADATA_FILE).read_text())
  del meta['digests']
  (copy / contract.METADATA_FILE).write_text(json.dumps(meta))
  data = model_file.read_bytes()
  model_file.write_bytes(data[: len(data) // 2])
  with caplog.at_level('WARNING'), pytest.raises(artifact.DamagedArtifactError) as info:
    artifact.open_artifact(copy)
  assert str(info.value).startswith(f'--exported {copy}: the stablehlo model cannot be loaded (')
  assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [
    f'--exported {copy}: its serving.json records no digests (exported before psp-jax wrote '
    'them): its files are used unchecked.'
  ]


@pytest.mark.e2e
def test_predict_refuses_a_damaged_artifact_in_one_message(exported, tmp_path):
  copy, model_file = damaged_copy(exported, tmp_path)
  model_file.write_bytes(model_file.read_bytes()[:1000])
  (tmp_path / 'images').mkdir()
  Image.fromarray(parity.images(1, (50, 70), seed=8)[0]).save(tmp_path / 'images' / 'a.png')
  args = [f'--exported={copy}', f'--input={tmp_path / "images"}', f'--output={tmp_path / "out"}']
  refused(cli('psp_jax.predict', *args), 1, 'model.stablehlo differs from its digest')
  assert not (tmp_path / 'out').exists()


def test_letterbox_keeps_the_aspect_and_maps_back(exported, model):
  assert runner.letterbox(40, 90, (65, 65)) == (18, 0, 29, 65)
  assert runner.letterbox(130, 65, (65, 65)) == (0, 16, 65, 32)  # round(32.5): even
  assert runner.letterbox(65, 65, (65, 65)) == (0, 0, 65, 65)
  run = runner.Runner.stablehlo(exported('stablehlo')[0])
  # At the artifact's size nothing is resized: the in-process argmax exactly.
  image = parity.images(1, SIZE, seed=4)
  expected = model.reference(image)[0].argmax(-1)
  assert np.mean(run.predict(image[0]) == expected) >= parity.MIN_LABEL_AGREEMENT
  # Twice the size in both sides: the same scene, so nearly the same labels, upsampled.
  big = np.repeat(np.repeat(image[0], 2, axis=0), 2, axis=1)
  labels = run.predict(big)
  assert labels.shape == (130, 130)
  assert np.mean(labels[::2, ::2] == expected) > 0.9
  canvas, box = run.canvas(parity.images(1, (40, 90))[0])
  assert box == (18, 0, 29, 65)
  np.testing.assert_array_equal(canvas[0, 0], [124, 116, 104])  # The mean colour, padded.


def test_runner_resizes_by_the_inference_rule():
  """runner.py repeats inference.planning's cv2-style bilinear resize (it cannot import it)."""
  for in_size, out_size in ((40, 29), (29, 130), (90, 65)):
    for ours, theirs in zip(
      runner.linear_indices(in_size, out_size),
      planning.linear_indices(in_size, out_size),
      strict=True,
    ):
      np.testing.assert_array_equal(ours, theirs)
  image = parity.images(1, (40, 90), seed=6)[0]
  np.testing.assert_array_equal(
    runner.resize_bilinear(image, 29, 65), planning.resize_bilinear(image, 29, 65)
  )
  labels = np.arange(12).reshape(3, 4)
  np.testing.assert_array_equal(runner.resize_nearest(labels, 6, 8)[::2, ::2], labels)


@pytest.mark.parametrize('fmt', ['stablehlo', 'onnx'])
@pytest.mark.e2e
def test_predict_exported_writes_the_pngs(fmt, exported, tmp_path):
  folder, _ = exported(fmt)
  images = tmp_path / 'images'
  images.mkdir()
  picture = parity.images(1, (50, 70), seed=8)[0]
  Image.fromarray(picture).save(images / 'scene.png')
  proc = cli(
    'psp_jax.predict', f'--exported={folder}', f'--input={images}', f'--output={tmp_path / "out"}'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  labels = np.asarray(Image.open(tmp_path / 'out' / 'scene.png'))
  assert labels.shape == (50, 70)
  np.testing.assert_array_equal(labels, artifact.open_artifact(folder).predict(picture))
  overlay = Image.open(tmp_path / 'out' / 'scene_overlay.png')
  assert overlay.size[1] >= 50 and (tmp_path / 'out' / 'scene_color.png').is_file()


# ---------------------------------------------------------------------------------------
# The command line's refusals: one message each, nothing written.


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
  environ = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PSP_JAX_TRACEBACK')}
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=environ,
    timeout=600,
  )


def snapshot(folder) -> dict[str, bytes]:
  return {str(p): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.e2e
def test_bad_requests_are_refused_before_any_work(checkpoint, tmp_path):
  out = tmp_path / 'out'
  base = [f'--checkpoint={checkpoint}', '--size=65x65', f'--output={out}']
  refused(cli('psp_jax.export', *base, '--format=tflite'), 2, '--format', 'stablehlo')
  proc = cli('psp_jax.export', *base[:1], '--format=onnx', '--size=big', f'--output={out}')
  refused(proc, 2, '--size', 'HEIGHTxWIDTH')
  refused(cli('psp_jax.export', *base, '--format=onnx', '--batch=0'), 2, '--batch')
  proc = cli('psp_jax.export', f'--checkpoint={tmp_path / "nowhere"}', *base[1:], '--format=onnx')
  refused(proc, 1, 'nowhere', '--checkpoint')
  proc = cli('psp_jax.export', *base[:1], '--size=33x33', f'--output={out}', '--format=stablehlo')
  refused(proc, 1, '33x33', 'too small', 'at least 41x41')
  assert not out.exists()
  # predict takes an artifact or a model, not both, and no procedure for an artifact.
  base = [f'--input={tmp_path}', f'--output={out}']
  refused(cli('psp_jax.predict', *base), 2, '--checkpoint', '--exported')
  refused(cli('psp_jax.predict', *base, f'--exported={out}', '--scales=1,2'), 2, '--scales')
  assert not out.exists()


@pytest.mark.e2e
def test_an_existing_artifact_is_not_overwritten(checkpoint, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / contract.METADATA_FILE).write_text('{"format": "stablehlo"}\n')
  (out / 'model.stablehlo').write_bytes(b'an earlier export')
  before = snapshot(out)
  base = [f'--checkpoint={checkpoint}', '--size=65x65', f'--output={out}', '--format=stablehlo']
  refused(cli('psp_jax.export', *base), 1, 'already holds', '--overwrite')
  assert snapshot(out) == before
  # With --overwrite the export replaces them.
  proc = cli('psp_jax.export', *base, '--overwrite')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'parity against the in-process model' in proc.stdout
  assert json.loads((out / contract.METADATA_FILE).read_text())['parity']['passed']
  assert (out / 'model.stablehlo').stat().st_size > 10_000


def test_failures_leave_the_output_as_it_was(model, tmp_path, monkeypatch):
  """A converter that fails and an artifact that disagrees: a message, no folder."""
  needs('onnx')

  def broken(*args, **kwargs):
    raise NotImplementedError('no ONNX lowering for primitive frobnicate')

  monkeypatch.setattr(onnx_graph, 'to_onnx', broken)
  with pytest.raises(formats.ConversionError, match='jax2onnx could not.*frobnicate'):
    model.export('onnx', tmp_path / 'onnx', size=SIZE, log=lambda _: None)
  assert not (tmp_path / 'onnx').exists()
  assert [p.name for p in tmp_path.iterdir()] == []  # The staging folder is gone too.

  class Off(exporter.Exporter):
    def reference(self, images):
      return super().reference(images) * 1.001  # The labels stay; the logits do not.

  off = Off(model.apply_fn, model.variables, model.model_config)
  with pytest.raises(
    parity.ParityError, match=r'in-process answer: logits rel L2 (9\.9\de-04|1\.00e-03)'
  ):
    off.export('stablehlo', tmp_path / 'shlo', size=SIZE, outputs='logits', log=lambda _: None)
  assert not (tmp_path / 'shlo').exists()


# TensorFlow 2.21's words for a SavedModel that jax 0.12.0.1 wrote (.ci/py312.sh, 2026-12-03).
TF_CANNOT_READ = (
  'Graph execution error: Detected at node XlaCallModule ... Cannot deserialize computation: '
  'UNKNOWN: <unknown>:0: error: loc("shape_assertion"): unregistered operation '
  "'vhlo.custom_call_v2' found in dialect ('vhlo') that does not allow unknown operations "
  '<unknown>:0: note: loc("shape_assertion"): in bytecode version 6 produced by: '
  'StableHLO_v1.18.0 <unknown>:0: error: failed to deserialize portable artifact using '
  'StableHLO_v1.13.7 [[{{node XlaCallModule}}]]'
)


def test_a_savedmodel_tensorflow_cannot_read_gets_one_message():
  pytest.importorskip('tensorflow')
  import tensorflow as tf  # noqa: PLC0415 (optional, as in psp_jax.serving.deps)

  e = deps.stablehlo_too_new(TF_CANNOT_READ, 'exported/savedmodel', '0.12.0.1', ' Done.')
  assert isinstance(e, deps.IncompatibleRuntimeError)
  text = str(e)
  assert text.startswith('exported/savedmodel: its program is StableHLO v1.18.0 (written by jax')
  assert f'TensorFlow {tf.__version__} cannot run' in text and 'up to v1.13.7' in text
  assert deps.CHECKED_PAIR in text and '--format stablehlo' in text and text.endswith(' Done.')
  assert deps.stablehlo_too_new('Incompatible shapes: [2,3] vs. [3]', 'x', '0.1') is None


@pytest.mark.e2e
def test_a_missing_optional_package_is_named_with_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # `import jax2onnx` now fails.
  with pytest.raises(deps.MissingDependencyError, match=r'jax2onnx.*psp-jax\[export\]'):
    deps.require('onnx')
  # The commands and the serving modules import without any of them (nor TensorFlow).
  blocked = ['jax2onnx', 'onnx', 'onnxruntime', 'tensorflow', 'flatbuffers']
  code = (
    f'import sys\nfor m in {blocked!r}: sys.modules[m] = None\n'
    'import psp_jax.export, psp_jax.predict\n'
    'from psp_jax.serving import artifact, exporter, formats, onnx_graph, runner\n'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_window_max_rewrite_is_exact():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)), jnp.float32)
  x = x.at[0, :3, :3].set(-1e9)  # A corner whose true maximum is far below 0.

  def pool(v):
    return jax.lax.reduce_window(
      v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )

  rewritten = onnx_graph.without_window_max(lambda v: pool(v) * 2.0)
  np.testing.assert_array_equal(rewritten(x), pool(x) * 2.0)
  primitives = {e.primitive.name for e in jax.make_jaxpr(rewritten)(x).jaxpr.eqns}
  assert 'reduce_window_max' not in primitives and 'max' in primitives


def test_sizes_and_batches_are_parsed():
  assert contract.parse_size('512x1024') == (512, 1024) and contract.parse_size('97') == (97, 97)
  assert contract.parse_batch('dynamic') is None and contract.parse_batch('4') == 4
  for bad in ('0x5', '5x', 'axb', '1x2x3'):
    with pytest.raises(contract.errors.UsageError):
      contract.parse_size(bad)
  contract.check_size((41, 41), {'output_stride': 8})
  contract.check_size((17, 17), {'output_stride': 8, 'use_ppm': False})
  with pytest.raises(contract.errors.InvalidInputError, match='at least 81x81'):
    contract.check_size((80, 200), {'output_stride': 16, 'bins': [1, 2, 6]})


@pytest.mark.slow
def test_full_size_pspnet50_in_every_format(tmp_path):
  """PSPNet-50 (random weights, randomised BN statistics) at 97x97, the three formats."""
  for fmt in contract.FORMATS:
    needs(fmt)
  config = dict(num_classes=150, depth=50)
  net = PSPNet(**config)
  variables = random_variables(net, seed=0)
  model = exporter.Exporter(lambda v, x: net.apply(v, x, train=False), variables, config)
  assert model.dataset == 'ade20k' and model.class_names[0] == 'wall'
  for fmt in contract.FORMATS:
    meta = model.export(fmt, tmp_path / fmt, size=(97, 97), outputs='logits', log=print)
    report = meta['parity']
    assert report['passed'] and report['rel_l2'] <= parity.MAX_REL_L2, (fmt, report)
    assert exporter.folder_size(str(tmp_path / fmt), fmt) > 150e6  # The weights are inside.
