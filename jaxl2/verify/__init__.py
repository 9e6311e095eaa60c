"""`verify_penalty` and `verify_update`: autodiff checks of users' regularization.

The probe point, the measurement, each leaf's fit and diagnosis, and the report.
"""
