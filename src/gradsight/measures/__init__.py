"""Measures computed from per-example gradients: projections and spectra."""
