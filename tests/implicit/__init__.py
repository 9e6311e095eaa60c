"""Tests of `jaxl2.implicit` (jaxl2/implicit/), one file per module or concept."""
