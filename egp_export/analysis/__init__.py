"""Tracing, the op vocabulary and the calibration analysis: what the rewrite passes read."""
