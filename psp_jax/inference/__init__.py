"""Inference: the official test procedure (planning, sliding window), evaluation, Segmenter."""
