"""Tests of `jaxl2.tuning` (jaxl2/tuning/), one file per module or concept."""
