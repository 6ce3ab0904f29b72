"""Ternary codes: the calibrated codec, its corrections, the TernaryMatMul function and the two-level activations."""
