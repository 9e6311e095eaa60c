"""Tests of `jaxl2.verify` (jaxl2/verify/), one file per module or concept."""
