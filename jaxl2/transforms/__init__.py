"""The optimizer side.

Coupled L2 as optax transforms, and λ in other frameworks' units.
"""
