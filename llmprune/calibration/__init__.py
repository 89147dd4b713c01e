"""Calibration: text sources -> token windows -> layer-by-layer statistics."""
