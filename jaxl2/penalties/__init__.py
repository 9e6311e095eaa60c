"""The penalties and the reductions they run on.

L2 and its family (L1, elastic net, L2-SP) with analytic gradients, one λ per group of leaves,
the steps every penalty shares, and the weighted per-leaf reductions (one kernel per layout of
leaves).
"""
