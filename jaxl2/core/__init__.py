"""What every part stands on.

Argument checks, leaf dtypes and the precision penalties accumulate in, named parameter paths,
params that span several hosts, checkpoints of long runs.
"""
