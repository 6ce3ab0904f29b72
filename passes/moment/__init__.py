"""Moment reduction: selectors, their error curves, the width budget, plans and the rewrite."""
