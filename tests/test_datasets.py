"""psp_jax.data.datasets, the table of data-set facts, and the code that reads it."""

import ml_collections
import numpy as np

from psp_jax.data import builders, classes, datasets
from psp_jax.data.builders import synthetic as synthetic_builder
from psp_jax.inference import segmenter
from psp_jax.serving import exporter
from psp_jax.train import aot


def test_each_benchmark_has_a_builder_named_and_sized_by_the_table():
  assert tuple(builders.BUILDERS) == datasets.BENCHMARKS
  for name, builder in builders.BUILDERS.items():
    table = datasets.DATASETS[name]
    assert (builder.name, builder.NUM_CLASSES) == (table.tfds_name, table.num_classes)
    assert set(table.splits) == {'train', 'validation'}
  assert synthetic_builder.Synthetic.name == datasets.DATASETS['synthetic'].tfds_name


def test_each_data_set_has_names_and_a_palette_of_its_classes():
  assert set(datasets.DATASETS) == set(classes.CLASS_NAMES) == set(classes.PALETTES)
  expected = {'ade20k': 150, 'voc2012': 21, 'cityscapes': 19, 'synthetic': 11}
  for name, table in datasets.DATASETS.items():
    assert table.name == name and table.num_classes == expected[name]
    assert classes.PALETTES[name].shape == (table.num_classes, 3)


def test_a_checkpoint_without_its_data_set_is_known_by_its_classes():
  assert [datasets.by_classes(k) for k in (150, 21, 19)] == list(datasets.BENCHMARKS)
  assert datasets.by_classes(11) is None  # the synthetic set is never guessed
  choice = segmenter.dataset_of(19)
  assert choice.name == 'cityscapes' and choice.class_names == classes.CLASS_NAMES['cityscapes']
  np.testing.assert_array_equal(choice.palette, classes.PALETTES['cityscapes'])
  own = {'classes': [f'c{i}' for i in range(19)], 'palette': np.ones((19, 3))}
  assert segmenter.dataset_of(19, meta=own).class_names[0] == 'c0'
  assert segmenter.dataset_of(19, 'cityscapes', meta=own).class_names[0] == 'road'
  unnamed = segmenter.dataset_of(11)
  assert unnamed.name is None and unnamed.class_names[0] == 'class 0'
  # The exporter makes the same choice (serving.json shows what predict shows).
  for dataset, first in ((None, 'c0'), ('cityscapes', 'road')):
    model = exporter.Exporter(
      lambda v, x: x, {}, {'num_classes': 19}, dataset=dataset, dataset_meta=own
    )
    assert (model.dataset, model.class_names[0]) == ('cityscapes', first)


def test_the_official_test_geometry_and_the_epoch_recipes_come_from_the_table():
  for name in datasets.BENCHMARKS:
    table = datasets.DATASETS[name]
    official = segmenter.default_inference(name)
    assert (official.base_size, official.crop_size) == (table.base_size, table.crop)
    one_epoch = dict(data=dict(name=name), num_train_steps=0, num_epochs=1, batch_size=16)
    assert aot.total_steps(ml_collections.ConfigDict(one_epoch)) == table.splits['train'] // 16
