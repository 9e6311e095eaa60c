"""Bad input: the right exception, naming the argument, the rule, the value and the path."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxl2

PARAMS = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}


@pytest.mark.parametrize(
  ("lam", "error", "message"),
  [
    (-0.1, ValueError, "`lam` must be a finite number >= 0; got -0.1"),
    (float("nan"), ValueError, "`lam` must be a finite number >= 0; got nan"),
    (float("inf"), ValueError, "`lam` must be a finite number >= 0; got inf"),
    (np.float32(-1), ValueError, "got -1.0"),
    (jnp.array(-2.0), ValueError, "got -2.0"),
    ("0.1", TypeError, "`lam` must be a real number; got '0.1' (str)"),
    (None, TypeError, "`lam` must be a real number; got None"),
    (1 + 2j, TypeError, "`lam` must be a real number"),
    (True, TypeError, "got the bool True"),
    (jnp.ones(3), ValueError, "`lam` must be a scalar (0-d); got an array of shape (3,)"),
    (np.array([0.1]), ValueError, "must be a scalar (0-d)"),
  ],
)
def test_bad_lam(lam, error, message):
  calls = [
    lambda: jaxl2.l2_penalty(PARAMS, lam, 10),
    lambda: jaxl2.l2_penalty_grad(PARAMS, lam, 10),
    lambda: jaxl2.regularized(lambda p: 0.0, lam, 10),
  ]
  if lam is not None:  # describe(lam=None) means "no penalty column", not a bad λ
    calls.append(lambda: jaxl2.describe(PARAMS, lam=lam, m=10))
  for call in calls:
    with pytest.raises(error, match=re.escape(message)):
      call()


@pytest.mark.parametrize(
  ("m", "error", "message"),
  [
    (0, ValueError, "`m` (the number of training inputs) must be a finite number > 0; got 0.0"),
    (-5, ValueError, "got -5.0"),
    (float("nan"), ValueError, "got nan"),
    (float("inf"), ValueError, "got inf"),
    ("100", TypeError, "`m` must be a real number; got '100' (str)"),
    ([100], TypeError, "`m` must be a real number"),
  ],
)
def test_bad_m(m, error, message):
  with pytest.raises(error, match=re.escape(message)):
    jaxl2.l2_penalty(PARAMS, 0.1, m)


def test_traced_lam_is_checked_under_checkify():
  checked = checkify.checkify(jax.jit(lambda lam: jaxl2.l2_penalty(PARAMS, lam, 10.0)))
  err, _ = checked(-1.0)
  with pytest.raises(checkify.JaxRuntimeError, match="`lam` must be a finite number >= 0"):
    err.throw()
  err, value = checked(1.0)
  err.throw()  # a good value passes
  np.testing.assert_allclose(float(value), 6.0 / 20.0, rtol=1e-7)
  # Without checkify, a traced negative λ cannot be checked: it is computed as given.
  assert float(jax.jit(lambda lam: jaxl2.l2_penalty(PARAMS, lam, 10.0))(-1.0)) < 0


def test_traced_non_scalar_lam_is_still_rejected():
  with pytest.raises(ValueError, match=re.escape("`lam` must be a scalar (0-d)")):
    jax.jit(lambda lam: jaxl2.l2_penalty(PARAMS, lam, 10.0))(jnp.ones(2))


@pytest.mark.parametrize("bad", ["a string", object()])
def test_non_array_leaf_names_its_path(bad):
  params = {"layer": {"kernel": jnp.ones((2, 2)), "name": bad}}
  with pytest.raises(TypeError, match=re.escape("leaf at 'layer/name' is a ")):
    jaxl2.l2_penalty(params, 0.1, 10)


def test_mask_structure_mismatch_shows_both_structures():
  with pytest.raises(ValueError, match=r"(?s)structure of `params` or of a prefix.*mask:.*params:"):
    jaxl2.l2_penalty(PARAMS, 0.1, 10, mask={"other": True})


@pytest.mark.parametrize(
  "mask",
  [
    jaxl2.by_regex(r"nothing/.*", strict=False),
    jaxl2.by_name("weight", strict=False),
    {"dense": {"kernel": False, "bias": False}},
  ],
)
def test_mask_selecting_nothing_is_an_error(mask):
  with pytest.raises(
    ValueError, match=r"`mask` selected no parameters out of 2 leaves.*'dense/bias'"
  ):
    jaxl2.l2_penalty(PARAMS, 0.1, 10, mask=mask)


@pytest.mark.parametrize(
  ("mask", "named", "near"),
  [
    (jaxl2.by_regex(r".*LayerNorm.*"), "'.*LayerNorm.*'", None),
    (jaxl2.by_regex({r".*/kernel": 1.0, r"dense/biass": 0.5}), "'dense/biass'", "'dense/bias'"),
    (jaxl2.by_name("kernel", "kernal"), "'kernal'", "'kernel'"),
  ],
)
@pytest.mark.parametrize("api", ["l2_penalty", "describe", "add_l2_grad"])
def test_pattern_that_matches_nothing_is_an_error_naming_it(mask, named, near, api):
  run = {
    "l2_penalty": lambda: jaxl2.l2_penalty(PARAMS, 0.1, 10, mask=mask),
    "describe": lambda: jaxl2.describe(PARAMS, mask=mask),
    "add_l2_grad": lambda: jaxl2.add_l2_grad(0.1, 10, mask=mask).init(PARAMS),
  }[api]
  with pytest.raises(ValueError, match=re.escape(named) + r".* matches no leaf") as info:
    run()
  assert "strict=False" in str(info.value)
  if near is not None:
    assert f"Near misses: {near}" in str(info.value)


def test_pattern_covered_by_an_earlier_pattern_is_not_an_error():
  mask = jaxl2.by_regex({r"dense/.*": 1.0, r"dense/kernel": 0.5})
  assert jaxl2.describe(PARAMS, mask=mask).n_selected == 2


def test_default_mask_selecting_nothing_is_an_error():
  with pytest.raises(ValueError, match=re.escape("mask=jaxl2.all_floating")):
    jaxl2.l2_penalty({"b": jnp.ones(3)}, 0.1, 10)


def test_invalid_regex_names_the_pattern():
  with pytest.raises(
    ValueError, match=re.escape("`by_regex` pattern '(kernel' is not a valid regex")
  ):
    jaxl2.by_regex("(kernel")


@pytest.mark.parametrize(
  ("mask", "where"),
  [
    ({"dense": {"kernel": -0.5, "bias": 0.0}}, "'dense/kernel'"),
    (lambda path, leaf: -2, "'dense/bias'"),
  ],
)
def test_negative_multiplier(mask, where):
  with pytest.raises(ValueError, match=re.escape(f"mask multiplier for {where} must be a finite")):
    jaxl2.l2_penalty(PARAMS, 0.1, 10, mask=mask)


def test_negative_multiplier_in_by_regex_raises_at_construction():
  with pytest.raises(ValueError, match=re.escape("by_regex pattern '.*'")):
    jaxl2.by_regex({".*": -1.0})


@pytest.mark.parametrize("value", ["yes", None, [1.0]])
def test_mask_callable_returning_non_number(value):
  with pytest.raises(TypeError, match=re.escape("must be a bool or a number")):
    jaxl2.l2_penalty(PARAMS, 0.1, 10, mask=lambda path, leaf: value)


@pytest.mark.parametrize("leaf", [jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2), bool)])
def test_mask_selecting_integer_or_bool_leaf_names_the_path(leaf):
  params = {"w": jnp.ones((2, 2)), "counts": leaf}
  with pytest.raises(TypeError, match=re.escape("leaf at 'counts' has dtype")):
    jaxl2.l2_penalty(params, 0.1, 10, mask=lambda path, x: True)


def test_regularized_rejects_non_callable():
  with pytest.raises(TypeError, match=re.escape("`loss_fn` must be callable")):
    jaxl2.regularized(3.0, 0.1, 10)


def test_traced_mask_values_are_rejected():
  def f(flag):
    return jaxl2.l2_penalty(PARAMS, 0.1, 10, mask={"dense": {"kernel": flag, "bias": False}})

  with pytest.raises(TypeError, match="must be concrete"):
    jax.jit(f)(1.0)


def test_describe_needs_both_lam_and_m():
  with pytest.raises(ValueError, match="needs both `lam` and `m`"):
    jaxl2.describe(PARAMS, lam=0.1)
