"""Block capture, block-wise calibration (MSAD and baselines)."""
