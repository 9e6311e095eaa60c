"""Tests of `jaxl2.transforms` (jaxl2/transforms/), one file per module or concept."""
