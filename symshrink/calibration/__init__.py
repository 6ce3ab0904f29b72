"""Calibration: feeds from any source, checked against the model, and the streamed per-site statistics."""
