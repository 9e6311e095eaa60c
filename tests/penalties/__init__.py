"""Tests of `jaxl2.penalties` (jaxl2/penalties/), one file per module or concept."""
