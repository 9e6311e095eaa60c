"""`jaxl2.tune_lam`: λ chosen by descent on log λ.

The search (one λ or one per group), retraining on minibatches between its steps, and its record
and checkpoints.
"""
