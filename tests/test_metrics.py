"""Tests of psp_jax.metrics against hszhao/semseg's intersectionAndUnion, written out in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psp_jax import metrics

from helpers import intersection_and_union

K = 6


def random_maps(seed, shape=(3, 17, 23)):
  rng = np.random.default_rng(seed)
  target = rng.integers(0, K - 1, shape)  # Class K-1 never in the ground truth.
  target[rng.random(shape) < 0.2] = 255
  pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, K - 2, shape))
  pred = np.where(pred == 255, 0, pred)  # Class K-1 never predicted either: absent.
  return pred, target


def test_confusion_matrix_counts_pairs_and_skips_ignore():
  pred, target = random_maps(0)
  got = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))(pred, target, K, 255)
  assert got.dtype == jnp.int32 and got.shape == (K, K)
  expected = np.zeros((K, K), np.int64)
  keep = target != 255
  np.add.at(expected, (target[keep], pred[keep]), 1)
  np.testing.assert_array_equal(np.asarray(got), expected)
  inter, union, tgt = intersection_and_union(pred, target, K)
  i2, u2, t2 = metrics.intersection_union_target(np.asarray(got))
  np.testing.assert_array_equal(i2, inter)
  np.testing.assert_array_equal(u2, union)
  np.testing.assert_array_equal(t2, tgt)


def test_confusion_matrix_mask_drops_padding_examples():
  pred, target = random_maps(1)
  mask = np.array([True, False, True])
  got = metrics.confusion_matrix(pred, target, K, 255, mask=mask[:, None, None])
  full = metrics.confusion_matrix(pred[[0, 2]], target[[0, 2]], K, 255)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(full))


@pytest.mark.parametrize('protocol', ['official', 'mmseg'])
def test_metrics_match_reference_formulas(protocol):
  pred, target = random_maps(2)
  confusion = np.asarray(metrics.confusion_matrix(pred, target, K))
  inter, union, tgt = intersection_and_union(pred, target, K)
  assert union[K - 1] == 0 and tgt[K - 1] == 0  # An absent class.
  got = metrics.compute_metrics(confusion, protocol=protocol)
  iou, acc = inter / (union + 1e-10), inter / (tgt + 1e-10)
  if protocol == 'official':  # tool/test.py: np.mean over all K classes, absent ones 0.
    np.testing.assert_allclose(got['mIoU'], np.mean(iou), rtol=1e-12)
    np.testing.assert_allclose(got['mAcc'], np.mean(acc), rtol=1e-12)
    np.testing.assert_allclose(got['iou'], iou, rtol=1e-12)
  else:  # mmsegmentation: nanmean, absent classes left out.
    np.testing.assert_allclose(got['mIoU'], np.mean(iou[:-1]), rtol=1e-9)
    np.testing.assert_allclose(got['mAcc'], np.mean(acc[:-1]), rtol=1e-9)
    assert np.isnan(got['iou'][K - 1])
  np.testing.assert_allclose(got['allAcc'], inter.sum() / (tgt.sum() + 1e-10), rtol=1e-12)


def test_official_and_mmseg_differ_by_the_absent_class():
  confusion = np.diag([5, 5, 0])  # Perfect on two classes, the third absent.
  assert metrics.compute_metrics(confusion)['mIoU'] == pytest.approx(2 / 3)
  assert metrics.compute_metrics(confusion, protocol='mmseg')['mIoU'] == pytest.approx(1.0)


def test_bad_protocol_and_shape_are_errors():
  with pytest.raises(ValueError, match='protocol'):
    metrics.compute_metrics(np.eye(2), protocol='voc')
  with pytest.raises(ValueError, match='square'):
    metrics.compute_metrics(np.ones((2, 3)))
