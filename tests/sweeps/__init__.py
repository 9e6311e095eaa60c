"""Tests of `jaxl2.sweeps` (jaxl2/sweeps/), one file per module or concept."""
