"""Measures: per-batch kernels over one captured forward/backward, with no I/O (`base`: the Measure protocol and
`combine`; `step`: backward_step; `spectra`: spectra, sq_norms; `projection`: projection, exact_grams;
`moments`: streaming moments). The analyses, a training monitor and gradient transforms share them."""
