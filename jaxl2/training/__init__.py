"""The jit-compiled, L2-regularized training step.

The step and its state, the model forms it calls, where the state and batches live, and the
metrics it reports.
"""
