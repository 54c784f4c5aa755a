"""Input data: sources (TFDS builders, list files, folders, a synthetic set) and pipelines."""

import os

# TensorFlow reads these at its first import, which may come from tensorflow_datasets in any
# submodule: set them here, before any submodule runs (both are needed to silence it).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
