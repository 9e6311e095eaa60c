"""Implicit differentiation at trained params: the λ tools' linear algebra.

`lam_hypergradient` and `effective_params`, their checked setup, and what they stand on: losses
and curvature over whole data sets, batched means, conjugate gradients, the Nyström
preconditioner, random sketches.
"""
