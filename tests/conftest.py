"""pytest configuration: hypothesis profiles."""

import os

from hypothesis import HealthCheck, settings

# CI runs the property tests at >= 200 examples; locally "dev" keeps them quick.
settings.register_profile(
  "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
  "dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
