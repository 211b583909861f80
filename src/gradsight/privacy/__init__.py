"""The gradient-privacy audit's math (no I/O): what shared gradients reveal, and what a defence costs.

Modules: `attacks` (analytic Linear recovery, iDLG labels, DLG, Inverting Gradients), `metrics` (PSNR, Hungarian
matching, token scores, ROUGE), `text` (bag-of-words token recovery, a TAG-like embedding attack on a tiny LM),
`store` (what gradsight's own stored factors and projected features leak), `clip` (per-example clipping from the
factored gradients: ghost norms and book-keeping sums), `accountant` (epsilon at delta through Opacus'
accountants), `dpsgd` (Poisson sampling, the DP-SGD step and a utility experiment on digits), `digits` (the
attack grid on digits).
"""
