"""Which leaves are weights, and with what multiplier on λ.

The one mask resolver, the builders (`Rule`, `by_role`, `by_regex`, ...) and the roles `by_role`
reads from a leaf's name, module and shape.
"""
