"""Input data: sources (TFDS builders, list files, folders, a synthetic set) and pipelines."""
