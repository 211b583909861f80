"""Statistics computed from per-example gradients: spectra per layer and group comparisons."""
