"""`jaxl2.sweep`: one model per λ, fold and seed, in one compiled program.

Each model's start, the compiled programs and their cache, the result, and resuming from
checkpoints.
"""
