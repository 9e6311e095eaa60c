"""Tests of `jaxl2.masks` (jaxl2/masks/), one file per module or concept."""
