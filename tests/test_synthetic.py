"""Tests of the synthetic data set: determinism, and that only the scene tells car from boat."""

import pathlib
import time

import ml_collections
import numpy as np
import pytest

from psp_jax.data import classes, sources, synthetic
from psp_jax.data.builders import synthetic as synthetic_builder


def test_render_is_deterministic():
  a = synthetic.render(7, 'train', 3, 65)
  b = synthetic.render(7, 'train', 3, 65)
  assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
  assert synthetic.render(8, 'train', 3, 65)[0].tobytes() != a[0].tobytes()  # Other seed.
  assert synthetic.render(7, 'validation', 3, 65)[0].tobytes() != a[0].tobytes()
  first = [x[1].tobytes() for x in synthetic.generate(7, 'train', 3, 33)]
  more = [x[1].tobytes() for x in synthetic.generate(7, 'train', 5, 33)]
  assert more[:3] == first  # Example i does not depend on the split size.
  image, label, _ = a
  assert image.shape == (65, 65, 3) and image.dtype == np.uint8
  assert label.shape == (65, 65) and label.max() < synthetic.NUM_CLASSES


def _read(data_dir: pathlib.Path, seed: int) -> tuple[list[bytes], list[bytes]]:
  builder = synthetic_builder.Synthetic(
    data_dir=str(data_dir), config=synthetic_builder.make_config(33, 6, 3, seed), num_workers=2
  )
  builder.download_and_prepare()
  examples = sorted(
    builder.as_dataset(split='train').as_numpy_iterator(), key=lambda e: int(e['index'])
  )
  records = sorted(pathlib.Path(builder.data_dir).glob('*.tfrecord*'))
  return [e['image'].tobytes() + e['label'].tobytes() for e in examples], [
    r.read_bytes() for r in records
  ]


def test_prepared_data_is_deterministic(tmp_path):
  examples, records = _read(tmp_path / 'a', seed=0)
  again, again_records = _read(tmp_path / 'b', seed=0)
  other, _ = _read(tmp_path / 'c', seed=1)
  assert len(examples) == 6 and examples == again
  assert records == again_records and len(records) == 2  # Byte-identical TFRecord files.
  assert all(x != y for x, y in zip(examples, other, strict=True))
  for index, example in enumerate(examples):
    image, label, _ = synthetic.render(0, 'train', index, 33)
    assert example == image.tobytes() + label.tobytes()


def test_swapping_the_scene_changes_only_the_object_label():
  """Car and boat (cow and seal) have the same pixels; only the scene around them differs."""
  for index in range(12):
    for scene_a, scene_b, a, b, ground_a, ground_b in (
      ('street', 'harbour', synthetic.CAR, synthetic.BOAT, synthetic.ROAD, synthetic.WATER),
      ('pasture', 'beach', synthetic.COW, synthetic.SEAL, synthetic.GRASS, synthetic.SAND),
    ):
      image_a, label_a, _ = synthetic.render(5, 'train', index, 65, scene=scene_a)
      image_b, label_b, _ = synthetic.render(5, 'train', index, 65, scene=scene_b)
      mask = label_a == a
      assert mask.sum() > 50  # A real object, not a speck.
      np.testing.assert_array_equal(label_b == b, mask)  # Same silhouette,
      np.testing.assert_array_equal(image_a[mask], image_b[mask])  # same pixels,
      assert (label_a == ground_a).any() and not (label_a == ground_b).any()  # other ground.
      assert (label_b == ground_b).any()


def test_scene_decides_the_object_class():
  counts = np.zeros(synthetic.NUM_CLASSES, int)
  for index in range(120):
    _, label, scene = synthetic.render(0, 'train', index, 49)
    present = set(np.unique(label).tolist())
    counts[list(present)] += 1
    band, ground, _, thing = synthetic.SCENE_LAYOUT[scene]
    assert {synthetic.SKY, ground, thing} <= present
    assert present - {synthetic.SKY, band, ground, thing} == set()  # Nothing from other scenes.
    assert (label == ground).sum() >= 0.06 * label.size  # The ground always shows.
  assert (counts > 15).all()  # Every class occurs in many images.


def test_ambiguous_classes_share_appearance_statistics():
  """Per-image object colour and size: same distribution for car/boat and cow/seal."""
  stats = {
    c: []
    for c in (
      synthetic.CAR,
      synthetic.BOAT,
      synthetic.COW,
      synthetic.SEAL,
      synthetic.ROAD,
      synthetic.WATER,
    )
  }
  for index in range(400):
    image, label, _ = synthetic.render(1, 'train', index, 33)
    for c, values in stats.items():
      mask = label == c
      if mask.any():
        values.append([*image[mask].mean(0), mask.mean() * 100])

  def z_scores(a, b):  # Two-sample z statistic per feature (R, G, B, area %).
    a, b = np.array(stats[a]), np.array(stats[b])
    return np.abs(a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))

  assert z_scores(synthetic.CAR, synthetic.BOAT).max() < 3.5
  assert z_scores(synthetic.COW, synthetic.SEAL).max() < 3.5
  assert (
    z_scores(synthetic.ROAD, synthetic.WATER)[:3].max() > 20
  )  # The test can see a real difference.


def test_classes_and_palette_cover_the_data_set():
  assert classes.CLASS_NAMES['synthetic'] == synthetic.CLASS_NAMES
  assert len(np.unique(classes.PALETTES['synthetic'], axis=0)) == synthetic.NUM_CLASSES
  assert {p for pair in synthetic.AMBIGUOUS_PAIRS for p in pair} == {
    synthetic.CAR,
    synthetic.BOAT,
    synthetic.COW,
    synthetic.SEAL,
  }


def test_source_prepares_on_first_use(tmp_path):
  config = ml_collections.ConfigDict(
    dict(name='synthetic', data_dir=str(tmp_path), num_classes=11, skip_bad_examples=False)
  )
  config.synthetic = ml_collections.ConfigDict(dict(image_size=17, num_train=4, num_val=2, seed=0))
  assert sources.num_examples(config, 'validation') == 2
  assert (tmp_path / 'psp_synthetic' / 'size17_train4_val2_seed0' / '1.0.0').is_dir()
  example = next(sources.get_source(config, 'train').as_numpy_iterator())
  assert example['image'].shape == (17, 17, 3) and example['label'].shape == (17, 17)
  config.synthetic.bogus = 1
  with pytest.raises(ValueError, match='bogus'):
    sources.num_examples(config, 'train')


def test_render_is_fast():
  start = time.perf_counter()
  for index in range(50):
    synthetic.render(0, 'train', index)
  # About 6 ms an image at 129x129 (2,200 images prepare in ~20 s); a loose bound for CI.
  assert time.perf_counter() - start < 10.0


def test_objects_need_context_from_far_away():
  """Many object pixels are over a third of the image away from any pixel that tells the
  scene (the ground; for cow/seal also the far band), so no small window decides them."""
  far, total = 0, 0
  for index in range(60):
    _, label, scene = synthetic.render(2, 'train', index)
    distance = synthetic.cue_distances(label, scene)
    far, total = far + (distance > 129 / 3).sum(), total + distance.size
  assert far / total > 0.07  # About 14% over many images.


def test_scene_cues_are_what_tells_the_look_alike_scenes_apart():
  assert synthetic.scene_cues('street') == (synthetic.ROAD,)  # Harbours have buildings too.
  assert synthetic.scene_cues('harbour') == (synthetic.WATER,)
  assert synthetic.scene_cues('pasture') == (synthetic.TREE, synthetic.GRASS)
  assert synthetic.scene_cues('beach') == (synthetic.WATER, synthetic.SAND)
  label = np.full((5, 9), synthetic.CAR, np.uint8)
  label[0, 0] = synthetic.ROAD
  label[0, 8] = synthetic.WATER  # Not a cue in a street.
  distance = synthetic.cue_distances(label, 'street')
  assert distance.shape == (43,) and distance[0] == 1 and distance[-1] == np.hypot(4, 8)
  assert distance[6] == 7  # (0, 7) is 7 from the road, not 1 from the water.
  label[0, 0] = synthetic.CAR
  assert np.isinf(synthetic.cue_distances(label, 'street')).all()
