"""Graph analysis: permutation-symmetric groups, the per-op handler registry, weight sites, graph helpers."""
