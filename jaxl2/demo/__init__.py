"""`jaxl2 demo`: λ chosen on validation, tested on held-out digits.

The demo and its data set, scikit-learn's bundled digits (no download).
"""
