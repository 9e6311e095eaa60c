"""Tests of `jaxl2.reports` (jaxl2/reports/), one file per module or concept."""
