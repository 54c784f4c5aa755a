"""Inference: the official test procedure (plan, sliding window), evaluation, Segmenter."""
