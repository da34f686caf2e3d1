"""Measuring discovery on the shapes world: effects, purity, coverage, reports, comparisons."""
