"""Hyperfunction codes: the per-tensor setting search, the HyperDecode functions and the rewrite."""
