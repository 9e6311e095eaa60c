"""Tests of `jaxl2.training` (jaxl2/training/), one file per module or concept."""
