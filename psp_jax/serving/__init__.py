"""Serving export: a checkpoint as a StableHLO, TF SavedModel or ONNX artifact, checked.

python -m psp_jax.export is the command line; exporter.Exporter the library; runner.Runner
runs a StableHLO artifact with JAX and NumPy alone (artifact.open_artifact any format).
Imports models, weights, interop, inference and data, and none of them imports serving.
"""
