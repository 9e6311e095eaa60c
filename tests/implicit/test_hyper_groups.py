"""The λ tools with one λ per group, against the closed form of two-block ridge regression.

Two blocks of features whose training columns are orthogonal (X₁ᵀX₂ = 0): a
strong signal in w₁, a weak one in w₂, unit noise. In jaxl2's scaling

    J = (1/m)·‖y − X₁w₁ − X₂w₂‖² + Σ_k (λ_k/2m)·‖w_k‖²

the normal equations decouple; with α_k = λ_k/2 and A_k = X_kᵀX_k + α_k·I,

    w_k*(λ_k) = A_k⁻¹·X_kᵀy,   dw_k*/dλ_k = −½·A_k⁻¹·w_k*,

so V(λ₁, λ₂) = (1/m_v)·‖r‖², r = y_v − X_{v1}·w₁* − X_{v2}·w₂*, has the partials
∂V/∂λ_k = −(2/m_v)·rᵀ·X_{vk}·dw_k*/dλ_k, and the effective number of parameters
is Σ_k Σ_i d_{ki}²/(d_{ki}² + λ_k/2), d_{ki} the singular values of X_k. The
best (λ₁, λ₂) is found from this closed form by `scipy.optimize` in float64.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import jaxl2

PATTERNS = ("w1", "w2")


def _blocks(
  m: int = 40, d: int = 8, seed: int = 2, m_val: int = 1000, *, separable: bool = False
) -> dict[str, np.ndarray]:
  """Orthogonal training blocks (strong signal 0.5·N(0, 1) in w₁, weak 0.15·N(0, 1) in w₂).

  ``separable``: the validation blocks orthogonal too, so that V(λ₁, λ₂) = V₁(λ₁) + V₂(λ₂)
  (the cross term w₁ᵀX_{v1}ᵀX_{v2}w₂ vanishes); otherwise Gaussian, and V couples them.
  """
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.normal(size=(m, 2 * d)))[0]
  mix = [np.diag(rng.uniform(0.6, 1.4, d)) @ np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in "ab"]
  x1, x2 = np.sqrt(m) * q[:, :d] @ mix[0], np.sqrt(m) * q[:, d:] @ mix[1]
  w1, w2 = 0.5 * rng.normal(size=d), 0.15 * rng.normal(size=d)
  g = rng.normal(size=(m_val, 2 * d))
  g = np.sqrt(m_val) * np.linalg.qr(g)[0] if separable else g
  xv1, xv2 = g[:, :d] @ mix[0], g[:, d:] @ mix[1]
  return {
    "x1": x1, "x2": x2, "y": x1 @ w1 + x2 @ w2 + rng.normal(size=m),
    "xv1": xv1, "xv2": xv2, "yv": xv1 @ w1 + xv2 @ w2 + rng.normal(size=m_val),
  }  # fmt: skip


def _block(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
  """w_k*(λ_k) and dw_k*/dλ_k (module docstring), float64."""
  a = x.T @ x + lam / 2 * np.eye(x.shape[1])
  w = np.linalg.solve(a, x.T @ y)
  return w, -0.5 * np.linalg.solve(a, w)


def _closed_form(data: dict[str, np.ndarray], lam: dict[str, float]) -> dict[str, Any]:
  """w*, V and (∂V/∂λ₁, ∂V/∂λ₂) in float64."""
  (w1, dw1), (w2, dw2) = (_block(data[f"x{k}"], data["y"], lam[f"w{k}"]) for k in (1, 2))
  r = data["yv"] - data["xv1"] @ w1 - data["xv2"] @ w2
  n = len(r)
  grad = {"w1": -2 / n * r @ (data["xv1"] @ dw1), "w2": -2 / n * r @ (data["xv2"] @ dw2)}
  return {"w": {"w1": w1, "w2": w2}, "val": float(np.mean(r**2)), "grad": grad}


def _optimum(data: dict[str, np.ndarray]) -> dict[str, float]:
  """argmin V over (log λ₁, log λ₂), float64 L-BFGS on the closed form and its gradient."""

  def f(u: np.ndarray) -> tuple[float, np.ndarray]:
    out = _closed_form(data, dict(zip(PATTERNS, np.exp(u), strict=True)))
    return out["val"], np.array([out["grad"][p] for p in PATTERNS]) * np.exp(u)

  res = scipy.optimize.minimize(f, [0.0, 0.0], jac=True, method="L-BFGS-B")
  root = scipy.optimize.root(lambda u: f(u)[1], res.x, tol=1e-14)  # polished: ∇V = 0
  assert np.max(np.abs(f(root.x)[1])) < 1e-15 and f(root.x)[0] <= res.fun  # a minimum, inside
  return dict(zip(PATTERNS, np.exp(root.x), strict=True))


def _apply(p: Any, x: Any) -> jax.Array:
  return x[0] @ p["w1"] + x[1] @ p["w2"]


def _mse(out: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((out - y) ** 2)


def _sets(data: dict[str, np.ndarray]) -> tuple[Any, Any]:
  j = {k: jnp.asarray(v) for k, v in data.items()}
  return ((j["x1"], j["x2"]), j["y"]), ((j["xv1"], j["xv2"]), j["yv"])


def _step(lam: Any, m: int = 40, lr: float = 0.05, apply_fn: Any = _apply) -> jaxl2.TrainStep:
  return jaxl2.make_train_step(apply_fn, _mse, optax.sgd(lr), lam=lam, m=m, mask=jaxl2.all_floating)


@pytest.mark.parametrize("lam", [{"w1": 2.0, "w2": 150.0}, {"w1": 0.3, "w2": 0.3}])
def test_vector_hypergradient_is_the_closed_form_partials(lam):
  data = _blocks()
  ref = _closed_form(data, lam)
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")  # W* is exact: no stationarity or solver warning
    train_set, val_set = _sets(data)
    train = _step(lam)
    state = train.init({k: jnp.asarray(v) for k, v in ref["w"].items()})
    hg = jaxl2.lam_hypergradient(train, state, train_set, val_set, damping=0.0)
    damped = jaxl2.lam_hypergradient(train, state, train_set, val_set)
    single = None
    if lam["w1"] == lam["w2"]:  # the same W* with one λ: its dV/dλ is the sum of the partials
      one = _step(lam["w1"])
      single = jaxl2.lam_hypergradient(one, one.init(state.params), train_set, val_set, damping=0.0)
  # Reference: ∂V/∂λ_k of the float64 closed form; 5e-9 relative (CG to tol 1e-10).
  assert list(hg.value) == list(PATTERNS)
  for p in PATTERNS:
    assert hg.value[p] == pytest.approx(ref["grad"][p], rel=5e-9)
  assert hg.val_loss == pytest.approx(ref["val"], rel=1e-12) and hg.residual <= 1e-10
  if single is not None:
    assert single.value == pytest.approx(sum(hg.value.values()), rel=1e-9)
  # The default damping is 1% of the smallest λ_g/m: a relative bias of at most ~1% per group.
  assert damped.damping == pytest.approx(0.01 * min(lam.values()) / 40, rel=1e-12)
  for p in PATTERNS:
    assert damped.value[p] == pytest.approx(ref["grad"][p], rel=2e-2)


def test_effective_params_with_groups_is_the_per_block_formula():
  data = _blocks()
  lam = {"w1": 2.0, "w2": 150.0}
  # Reference: Σ_k Σ_i d_ki²/(d_ki² + λ_k/2) from NumPy's singular values, float64.
  expected = sum(
    float(np.sum(d**2 / (d**2 + lam[f"w{k}"] / 2)))
    for k in (1, 2)
    for d in [np.linalg.svd(data[f"x{k}"], compute_uv=False)]
  )
  with jax.enable_x64(True):
    train_set, _ = _sets(data)
    train = _step(lam)
    state = train.init({p: jnp.zeros(8) for p in PATTERNS})
    n_eff = jaxl2.effective_params(train, state, train_set, damping=0.0)
  assert n_eff.exact and n_eff.value == pytest.approx(expected, rel=1e-10)


def _tune(
  data: dict[str, np.ndarray], lam0: dict[str, float], apply_fn: Any = _apply, **options: Any
) -> Any:
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the first λ is trained from 0
    train_set, val_set = _sets(data)
    train = _step(lam0, apply_fn=apply_fn)
    start = train.init({p: jnp.zeros(8) for p in PATTERNS})
    return jaxl2.tune_lam(
      train,
      start,
      train_set,
      val_set,
      train_steps=600,
      damping=0.0,
      max_iter=30,
      **{"lam_bounds": (1e-3, 1e3), **options},
    )


@pytest.mark.parametrize("separable", [False, True])
def test_tune_lam_reaches_the_two_dimensional_closed_form_optimum(separable):
  data = _blocks(separable=separable)
  best = _optimum(data)  # coupled: λ₁ = 3.80, λ₂ = 56.3 (15× apart)
  # Separable, from λ₁ = λ₁*: the first group's steps are soon small while the second is far
  # from λ₂*: the search must go on until every group's step is below rtol.
  result = _tune(data, {"w1": best["w1"] if separable else 1.0, "w2": 1.0})
  assert result.converged, result.reason
  for p in PATTERNS:
    assert abs(np.log(result.lam[p]) - np.log(best[p])) <= 0.05  # the tolerance
  ref = _closed_form(data, result.lam)
  assert result.val_loss == pytest.approx(ref["val"], rel=1e-6)
  for p in PATTERNS:
    np.testing.assert_allclose(np.asarray(result.params[p]), ref["w"][p], rtol=0, atol=1e-6)
  assert {p: float(v) for p, v in result.state.lam.items()} == result.lam
  # One λ for both blocks does worse (its best, from the closed form along λ₁ = λ₂).
  one = scipy.optimize.minimize_scalar(
    lambda u: _closed_form(data, dict.fromkeys(PATTERNS, np.exp(u)))["val"], bounds=(-5, 8)
  )
  assert result.val_loss < one.fun
  # Every step of the path records its closed-form partials (where W* was reached).
  for step in result.path:
    if step.stationarity < 1e-6:
      partials = _closed_form(data, step.lam)["grad"]
      for p in PATTERNS:
        assert step.hypergradient[p] == pytest.approx(partials[p], rel=1e-6, abs=1e-12)


def test_a_grouped_search_resumes_from_an_earlier_checkpoint_to_the_same_result(tmp_path):
  # The latest checkpoint removed, a rerun resumes from the one before and must end as the
  # uninterrupted run did: the same λ path, hypergradients and params, bit for bit.
  calls = []  # model evaluations (training steps and the tools' passes), counted from inside

  def counted(p: Any, x: Any) -> jax.Array:
    jax.debug.callback(lambda: calls.append(1))
    return _apply(p, x)

  data = _blocks()
  lam0 = {"w1": 1.0, "w2": 1.0}
  first = _tune(data, lam0, counted, checkpoint_dir=tmp_path / "ckpt")
  uninterrupted, calls[:] = len(calls), []
  steps = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
  assert len(steps) == 2
  shutil.rmtree(tmp_path / "ckpt" / str(steps[-1]))
  again = _tune(data, lam0, counted, checkpoint_dir=tmp_path / "ckpt")
  assert 0 < len(calls) < uninterrupted / 2  # it resumed near the end: one λ left to train
  # repr: floats written exactly (NaN of diverged steps included), dicts in order.
  assert repr(again.path) == repr(first.path) and again.lam == first.lam
  assert again.reason == first.reason
  for p in PATTERNS:
    np.testing.assert_array_equal(np.asarray(again.params[p]), np.asarray(first.params[p]))


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"lam0": 1.0}, TypeError, r"`lam0` must be a table with the patterns"),
    ({"lam0": {"w1": 1.0}}, TypeError, r"`lam0` must be a table with the patterns"),
    ({"lam0": {"w1": 1.0, "w2": 1e7}}, ValueError, r"`lam0\['w2'\]` must lie within"),
    ({"lam_bounds": {"w1": (1e-3, 1e3)}}, TypeError, r"`lam_bounds` must be a table"),
    ({"lam_bounds": {"w1": (1.0, 0.1), "w2": (1e-3, 1e3)}}, ValueError, r"`lam_bounds\['w1'\]`"),
  ],
)
def test_grouped_tune_lam_checks_its_start(kwargs, error, match):
  data = _blocks()
  train_set, val_set = _sets(data)
  train = _step({"w1": 1.0, "w2": 1.0})
  state = train.init({p: jnp.zeros(8) for p in PATTERNS})
  with pytest.raises(error, match=match):
    jaxl2.tune_lam(train, state, train_set, val_set, train_steps=1, **kwargs)
  one = _step(1.0)
  with pytest.raises(TypeError, match="built with one λ"):
    jaxl2.tune_lam(one, one.init(state.params), train_set, val_set, train_steps=1, lam0={"w1": 1.0})


def test_the_search_bound_names_the_group():
  data = _blocks()
  bounds = {"w1": (1e-3, 1e3), "w2": (1e-3, 10.0)}  # λ₂* = 56 lies beyond λ₂'s λ_max
  result = _tune(data, {"w1": 1.0, "w2": 1.0}, lam_bounds=bounds)
  assert not result.converged
  assert "λ_max = 10 for 'w2'" in result.reason, result.reason
  assert result.path[-1].lam["w2"] == pytest.approx(10.0, rel=1e-12)
