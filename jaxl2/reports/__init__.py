"""What jaxl2 shows people.

`describe`'s table of what is penalized, and the one table layout of every report.
"""
