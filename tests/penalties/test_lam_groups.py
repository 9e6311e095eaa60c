"""One λ per group (`lam={pattern: λ_g}`): the penalty, the train step, the vector
hypergradient and `tune_lam`, against float64 references and closed forms.

The λ tools are held to ridge regression with two blocks of features whose
training columns are orthogonal (X₁ᵀX₂ = 0), a strong signal in w₁ and a weak
one in w₂. In jaxl2's scaling J = (1/m)·‖y − X₁w₁ − X₂w₂‖² + Σ_k (λ_k/2m)·‖w_k‖²
the normal equations decouple: with α_k = λ_k/2,

    w_k*(λ_k) = (X_kᵀX_k + α_k·I)⁻¹·X_kᵀy,   dw_k*/dλ_k = −½·(X_kᵀX_k + α_k·I)⁻¹·w_k*,

so V(λ₁, λ₂) = (1/m_v)·‖r‖², r = y_v − X_{v1}·w₁* − X_{v2}·w₂*, has the partials
∂V/∂λ_k = −(2/m_v)·rᵀ·X_{vk}·dw_k*/dλ_k, and the effective number of parameters
is Σ_k Σ_i d_{ki}²/(d_{ki}² + λ_k/2) (d_{ki} the singular values of X_k).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2
from tests.helpers import as_f64

# ---- the penalty and its gradient --------------------------------------------------------

M = 50.0
GROUPS = {"encoder/.*": 0.3, "decoder/.*": 2.0, ".*": 7.0}  # overlapping: the first match wins
MASK = jaxl2.by_regex({".*/kernel": 1.0, ".*/embedding": 0.5})


def _params(dtype: Any = jnp.float32) -> dict[str, Any]:
  keys = jax.random.split(jax.random.key(0), 6)
  shapes = {"encoder": (4, 3), "decoder": (3, 2), "head": (2, 5)}
  out: dict[str, Any] = {
    name: {"kernel": jax.random.normal(k, s, dtype), "bias": jax.random.normal(k2, s[-1:], dtype)}
    for (name, s), k, k2 in zip(shapes.items(), keys[:3], keys[3:], strict=True)
  }
  out["encoder"]["embedding"] = jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(6, 2)
  return out


def _reference(params: dict[str, Any], lam: dict[str, float], m: float) -> tuple[float, dict]:
  """Penalty and gradient in float64 NumPy, groups written out by hand (no regex)."""
  group = {"encoder": "encoder/.*", "decoder": "decoder/.*", "head": ".*"}
  total, grad = 0.0, {}
  for layer, leaves in params.items():
    grad[layer] = {}
    for name, w in leaves.items():
      c = {"kernel": 1.0, "embedding": 0.5}.get(name, 0.0)
      w = as_f64(w)
      total += lam[group[layer]] / (2 * m) * c * np.sum(w**2)
      grad[layer][name] = lam[group[layer]] / m * c * w
  return total, grad


def test_group_penalty_and_gradient_are_the_float64_reference_and_autodiff():
  params = _params()
  expected, expected_grad = _reference(params, GROUPS, M)
  penalty = jax.jit(lambda p: jaxl2.l2_penalty(p, GROUPS, M, mask=MASK))(params)
  grad = jaxl2.l2_penalty_grad(params, GROUPS, M, mask=MASK)
  autodiff = jax.jit(jax.grad(lambda p: jaxl2.l2_penalty(p, GROUPS, M, mask=MASK)))(params)
  # Reference: float64 NumPy; float32 accumulation, 1e-6 relative.
  assert penalty.dtype == jnp.float32
  assert float(penalty) == pytest.approx(expected, rel=1e-6)
  for tree in (grad, autodiff):
    for layer, leaves in expected_grad.items():
      for name, ref in leaves.items():
        np.testing.assert_allclose(as_f64(tree[layer][name]), ref, rtol=1e-6, atol=1e-7)


def test_each_lambda_may_be_traced_and_its_derivative_is_its_group_norm():
  # d penalty / dλ_g = Σ_{j ∈ g} c_j‖W_j‖² / 2m (float64 NumPy). The table goes through jit
  # as an argument, so its keys arrive sorted: disjoint patterns keep the groups.
  params = _params()
  disjoint = {"encoder/.*": 0.3, "decoder/.*": 2.0, "head/.*": 7.0}
  _, by_group = _reference(params, dict.fromkeys(GROUPS, 1.0), M)
  expected = {
    p: sum(float(np.sum(g * as_f64(params[layer][n]))) / 2 for n, g in by_group[layer].items())
    for p, layer in zip(disjoint, ("encoder", "decoder", "head"), strict=True)
  }
  lam = {p: jnp.asarray(v) for p, v in disjoint.items()}
  slopes = jax.jit(jax.grad(lambda t: jaxl2.l2_penalty(params, t, M, mask=MASK)))(lam)
  for p, value in expected.items():
    assert float(slopes[p]) == pytest.approx(value, rel=1e-6)


def test_one_catch_all_pattern_is_the_one_lambda_penalty_bit_for_bit():
  params = _params()
  one = jaxl2.l2_penalty(params, 0.7, M, mask=MASK)
  assert float(jaxl2.l2_penalty(params, {".*": 0.7}, M, mask=MASK)) == float(one)
  grads = jaxl2.l2_penalty_grad(params, {".*": 0.7}, M, mask=MASK)
  for a, b in zip(
    jax.tree_util.tree_leaves(grads),
    jax.tree_util.tree_leaves(jaxl2.l2_penalty_grad(params, 0.7, M, mask=MASK)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
  ("lam", "error", "match"),
  [
    ({"encoder/.*": 1.0}, ValueError, r"leaf at 'decoder/kernel' matches no pattern of the `lam`"),
    ({**GROUPS, "decodr/.*": 1.0}, ValueError, r"pattern 'decodr/\.\*' gets no leaf: it matches"),
    ({".*": 1.0, "head/.*": 1.0}, ValueError, r"'head/\.\*' gets no leaf: .* taken by earlier"),
    ({**GROUPS, "decoder/.*": -1.0}, ValueError, r"`lam\['decoder/\.\*'\]` must be a finite"),
    ({}, ValueError, "`lam` is an empty"),
    ({1: 1.0}, TypeError, "`lam` keys must be regex strings"),
    ({"(": 1.0}, ValueError, "is not a valid regex"),
  ],
)
def test_bad_tables_are_named(lam, error, match):
  with pytest.raises(error, match=match):
    jaxl2.l2_penalty(_params(), lam, M, mask=MASK)


@pytest.mark.parametrize(
  "call",
  [
    lambda p: jaxl2.add_l2_grad(GROUPS, M),
    lambda p: jaxl2.l2_sp_grad(p, GROUPS, M),
    lambda p: jaxl2.l1_penalty(p, GROUPS, M),
    lambda p: jaxl2.elastic_net_penalty(p, GROUPS, M, l1_ratio=0.5),
    lambda p: jaxl2.l2_sp_penalty(p, p, GROUPS, M),
  ],
)
def test_functions_with_one_lambda_refuse_a_table_and_say_what_to_do(call):
  with pytest.raises(TypeError, match=r"`lam` is a \{pattern: λ\} table .* mask=jaxl2\.by_regex"):
    call(_params())


def test_sweep_refuses_a_table():
  for lams, match in ((GROUPS, "`lams` is a {pattern: λ} table"), ([GROUPS], "`lams[0]` is a")):
    with pytest.raises(TypeError, match=match.replace("{", r"\{").replace("[", r"\[")):
      jaxl2.sweep(None, None, None, optax.sgd(0.1), None, jnp.ones(1), lams=lams, steps=1)


# ---- make_train_step ----------------------------------------------------------------------


def _apply(p: Any, x: jax.Array) -> jax.Array:
  return (
    jnp.tanh(jnp.tanh(x @ p["encoder"]["kernel"]) @ p["decoder"]["kernel"]) @ p["head"]["kernel"]
  )


def _mse(out: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((out - y) ** 2)


def test_train_step_with_a_table_is_the_hand_written_step():
  # Reference: the loss written out, Σ over groups of (λ_g/2m)·c·‖W‖² with the groups by hand,
  # adam by optax on jax.grad of it; λ changed by set_lam half way.
  params = _params()
  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jax.random.normal(jax.random.key(2), (8, 5))
  train = jaxl2.make_train_step(_apply, _mse, optax.adam(0.05), lam=GROUPS, m=M, mask=MASK)
  state = train.init(params)
  second = {".*": 0.1, "decoder/.*": 4.0, "encoder/.*": 0.0}  # any key order

  def by_hand(p: Any, lam: dict[str, float]) -> jax.Array:
    layers = {"encoder": "encoder/.*", "decoder": "decoder/.*", "head": ".*"}
    penalty = sum(lam[g] / (2 * M) * jnp.sum(p[k]["kernel"] ** 2) for k, g in layers.items())
    penalty += lam["encoder/.*"] / (2 * M) * 0.5 * jnp.sum(p["encoder"]["embedding"] ** 2)
    return _mse(_apply(p, x), y) + penalty

  tx = optax.adam(0.05)
  p, opt = params, tx.init(params)
  for i in range(6):
    lam = GROUPS if i < 3 else second
    if i == 3:
      state = train.set_lam(state, second)
    loss, grads = jax.value_and_grad(by_hand)(p, lam)
    penalty = loss - _mse(_apply(p, x), y)
    updates, opt = tx.update(grads, opt, p)
    p = optax.apply_updates(p, updates)
    state, metrics = train(state, (x, y))  # metrics at the incoming params
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["penalty"]) == pytest.approx(float(penalty), rel=1e-5)
  for a, b in zip(
    jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(p), strict=True
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert set(state.lam) == set(GROUPS) and float(state.lam["decoder/.*"]) == 4.0


def test_train_step_lambda_must_keep_its_form():
  train = jaxl2.make_train_step(_apply, _mse, optax.sgd(0.1), lam=GROUPS, m=M, mask=MASK)
  state = train.init(_params())
  with pytest.raises(ValueError, match=r"missing \['\.\*'\], unknown \['head'\]"):
    train.set_lam(state, {"encoder/.*": 1.0, "decoder/.*": 1.0, "head": 1.0})
  with pytest.raises(TypeError, match="must be a {pattern: λ} table".replace("{", r"\{")):
    train.set_lam(state, 1.0)
  one = jaxl2.make_train_step(_apply, _mse, optax.sgd(0.1), lam=1.0, m=M, mask=MASK)
  with pytest.raises(TypeError, match="built with one λ"):
    one.init(_params(), lam=GROUPS)
  with pytest.raises(ValueError, match="gets no leaf"):  # checked against the params at init
    jaxl2.make_train_step(_apply, _mse, optax.sgd(0.1), lam={**GROUPS, "x": 1.0}, m=M).init(
      _params()
    )
