"""`lam_hypergradient`, `effective_params` and `tune_lam` against closed forms and re-solved optima.

Ridge regression with an unpenalized intercept, in jaxl2's scaling:

    J(w, b) = (1/m)·‖y − Xw − b·1‖² + (λ/2m)·‖w‖²,

which is m⁻¹ times ‖y − Xw − b‖² + α‖w‖² with α = λ/2. With X_c = X − 1·x̄ᵀ =
U·diag(d)·Vᵀ (the centered design) and y_c = y − ȳ, the minimizer is

    w*(λ) = V·diag(d/(d² + α))·Uᵀy_c,   b*(λ) = ȳ − x̄ᵀw*,
    dw*/dλ = −½·V·diag(d/(d² + α)²)·Uᵀy_c,   db*/dλ = −x̄ᵀ·dw*/dλ,

and the validation loss V(λ) = (1/m_v)·‖r‖², r = y_v − X_v·w* − b*, has
dV/dλ = −(2/m_v)·rᵀ(X_v·dw*/dλ + db*/dλ). The effective number of parameters is
the trace of the ridge smoother Z(ZᵀZ + α·P)⁻¹Zᵀ (Z = [X, 1], P = diag(1, …, 1, 0)),
because H_d = (2/m)·ZᵀZ and H_d + (λ/m)·P = (2/m)·(ZᵀZ + α·P): the unpenalized
intercept splits off as the projection onto 1 (trace 1) and the rest is the
ridge smoother of X_c, so tr = 1 + Σ d_i²/(d_i² + λ/2). Without an intercept
it is Σ d_i²/(d_i² + λ/2) with the d_i of X itself: the issue's formula.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from jax import flatten_util  # noqa: F401 (jax.flatten_util)

import jaxl2

RIDGE_MASK = {"b": False, "w": True}


def _ridge_data(m: int = 60, d: int = 8, seed: int = 0, scale: float = 0.3) -> tuple[Any, ...]:
  """Isotropic features (well-conditioned ridge), a small true w and unit noise."""
  rng = np.random.default_rng(seed)
  w_true = scale * rng.normal(size=d)

  def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, d)) + 0.5  # off-center, so that the intercept matters
    return x, x @ w_true + 1.5 + rng.normal(size=n)

  return (*draw(m), *draw(200))


def _ridge_closed_form(x: np.ndarray, y: np.ndarray, lam: float) -> dict[str, Any]:
  """w*, b* and their λ-derivatives in float64 NumPy (module docstring)."""
  x_bar, y_bar = x.mean(axis=0), y.mean()
  u, d, vt = np.linalg.svd(x - x_bar, full_matrices=False)
  uty = u.T @ (y - y_bar)
  alpha = lam / 2
  w = vt.T @ (d / (d**2 + alpha) * uty)
  dw = -0.5 * vt.T @ (d / (d**2 + alpha) ** 2 * uty)
  return {"w": w, "b": y_bar - x_bar @ w, "dw": dw, "db": -x_bar @ dw, "d": d}


def _ridge_val(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, lam: float):
  """V(λ) and dV/dλ from the closed form."""
  sol = _ridge_closed_form(x, y, lam)
  r = yv - xv @ sol["w"] - sol["b"]
  return np.mean(r**2), -2 / len(yv) * r @ (xv @ sol["dw"] + sol["db"])


def _ridge_losses(x: Any, y: Any, xv: Any, yv: Any) -> tuple[Any, Any]:
  def mse(p: Any, a: Any, b: Any) -> jax.Array:
    return jnp.mean((a @ p["w"] + p["b"] - b) ** 2)

  return (lambda p: mse(p, x, y)), (lambda p: mse(p, xv, yv))


@pytest.mark.parametrize("lam", [0.5, 8.0, 60.0])
def test_ridge_hypergradient_is_the_closed_form_derivative(lam):
  x, y, xv, yv = _ridge_data()
  sol = _ridge_closed_form(x, y, lam)
  _, expected = _ridge_val(x, y, xv, yv, lam)
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")  # W* is exact: no stationarity or solver warning
    train, val = _ridge_losses(*map(jnp.asarray, (x, y, xv, yv)))
    params = {"b": jnp.asarray(sol["b"]), "w": jnp.asarray(sol["w"])}
    hg = jaxl2.lam_hypergradient(train, val, params, lam, len(y), mask=RIDGE_MASK)
  # Reference: dV/dλ of the closed form, float64; tolerance 1e-6 relative (the issue's).
  assert hg.value == pytest.approx(expected, rel=1e-6)
  assert hg.residual <= 1e-10 and hg.stationarity < 1e-8 and not hg.negative_curvature
  assert hg.val_loss == pytest.approx(_ridge_val(x, y, xv, yv, lam)[0], rel=1e-12)


def test_ridge_hypergradient_uses_the_mask_multiplier():
  # A multiplier c on w is λ·c in the closed form: dV/dλ = c·V'(c·λ).
  x, y, xv, yv = _ridge_data(seed=1)
  lam, c = 6.0, 0.25
  sol = _ridge_closed_form(x, y, c * lam)
  _, slope = _ridge_val(x, y, xv, yv, c * lam)
  with jax.enable_x64(True):
    train, val = _ridge_losses(*map(jnp.asarray, (x, y, xv, yv)))
    params = {"b": jnp.asarray(sol["b"]), "w": jnp.asarray(sol["w"])}
    hg = jaxl2.lam_hypergradient(train, val, params, lam, len(y), mask={"b": 0.0, "w": c})
  assert hg.value == pytest.approx(c * slope, rel=1e-6)  # closed form, float64


def test_numpy_float64_params_without_x64_are_solved_in_float32():
  # 64-bit disabled: NumPy float64 leaves are computed in float32 as JAX computes them,
  # with float32's default tol (float64's 1e-10 is out of a float32 solve's reach).
  x, y, xv, yv = _ridge_data()
  lam = 8.0
  sol = _ridge_closed_form(x, y, lam)
  train, val = _ridge_losses(*map(jnp.asarray, (x, y, xv, yv)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "float64 is not available" truncation, no solver warning
    hg = jaxl2.lam_hypergradient(
      train, val, {"b": np.float64(sol["b"]), "w": sol["w"]}, lam, len(y), mask=RIDGE_MASK
    )
  # Reference: the float64 closed form; float32 rounding of W* and the data bounds the error.
  assert hg.value == pytest.approx(_ridge_val(x, y, xv, yv, lam)[1], rel=1e-3)
  assert hg.residual <= 1e-4


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("lam", [0.1, 5.0, 300.0])
def test_ridge_effective_params_is_the_classical_formula(lam, intercept):
  x, y, _, _ = _ridge_data()
  # d_i: singular values of the centered design with an intercept, of X itself without.
  d = np.linalg.svd(x - x.mean(axis=0) if intercept else x, compute_uv=False)
  expected = float(intercept) + np.sum(d**2 / (d**2 + lam / 2))  # module docstring
  with jax.enable_x64(True):
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    if intercept:
      train, _ = _ridge_losses(xj, yj, xj, yj)
      params, mask = {"b": jnp.zeros(()), "w": jnp.zeros(x.shape[1])}, RIDGE_MASK
    else:
      train = lambda p: jnp.mean((xj @ p["w"] - yj) ** 2)  # noqa: E731
      params, mask = {"w": jnp.zeros(x.shape[1])}, {"w": True}
    result = jaxl2.effective_params(train, params, lam, len(y), mask=mask)
  assert result.exact and result.stderr == 0.0
  assert result.value == pytest.approx(expected, rel=1e-8)  # float64


def test_effective_params_falls_as_lam_grows():
  x, y, _, _ = _ridge_data()
  with jax.enable_x64(True):
    train, _ = _ridge_losses(*map(jnp.asarray, (x, y, x, y)))
    params = {"b": jnp.zeros(()), "w": jnp.zeros(x.shape[1])}
    values = [
      jaxl2.effective_params(train, params, lam, len(y), mask=RIDGE_MASK).value
      for lam in (0.0, 1.0, 100.0, 1e6)
    ]
  # λ = 0: every direction counts (9); λ → ∞: only the unpenalized intercept (1).
  assert values[0] == pytest.approx(9.0, rel=1e-10) and values[-1] == pytest.approx(1.0, rel=1e-3)
  assert all(a > b for a, b in itertools.pairwise(values))


# ---- logistic regression: central differences over re-solved optima ----------


def _logistic_problem(seed: int = 0) -> tuple[Any, ...]:
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=4)

  def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 4))
    p = 1 / (1 + np.exp(-(x @ w_true - 0.5)))
    return x, (rng.uniform(size=n) < p).astype(np.float64)

  return (*draw(60), *draw(200))


def _bce(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  z = x @ p["w"] + p["b"]
  return jnp.mean(jax.nn.softplus(z) - y * z)


def _newton_solve(train: Any, lam: float, m: int, d: int) -> dict[str, jax.Array]:
  """The optimum of train + (λ/2m)·‖w‖² by Newton's method on the dense Hessian (float64).

  Independent of jaxl2's CG: a direct solve per step, run until the gradient
  is at rounding level (logistic regression is strictly convex with λ > 0).
  """

  def objective(v: jax.Array) -> jax.Array:
    return train({"b": v[0], "w": v[1:]}) + lam / (2 * m) * jnp.sum(v[1:] ** 2)

  step = jax.jit(lambda v: v - jnp.linalg.solve(jax.hessian(objective)(v), jax.grad(objective)(v)))
  v = jnp.zeros(d + 1)
  for _ in range(50):
    v = step(v)
    if float(jnp.linalg.norm(jax.grad(objective)(v))) < 1e-14:
      break
  return {"b": v[0], "w": v[1:]}


@pytest.mark.parametrize("lam", [0.5, 5.0])
def test_logistic_hypergradient_matches_central_differences(lam):
  x, y, xv, yv = map(np.asarray, _logistic_problem())
  with jax.enable_x64(True):
    x, y, xv, yv = map(jnp.asarray, (x, y, xv, yv))
    train, val = (lambda p: _bce(p, x, y)), (lambda p: _bce(p, xv, yv))
    m = len(y)
    hg = jaxl2.lam_hypergradient(
      train, val, _newton_solve(train, lam, m, 4), lam, m, mask=RIDGE_MASK
    )
    h = 1e-3 * lam
    plus = float(val(_newton_solve(train, lam + h, m, 4)))
    minus = float(val(_newton_solve(train, lam - h, m, 4)))
  finite_difference = (plus - minus) / (2 * h)  # truncation error O(h²) ≈ 1e-6 relative
  assert hg.value == pytest.approx(finite_difference, rel=1e-4)


# ---- a small MLP: Hutchinson within 3 standard errors of exact ----------------


def _mlp(p: Any, x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_mlp_hutchinson_estimate_is_within_three_standard_errors_of_exact():
  # A 3-8-1 tanh MLP fitted to a teacher of the same shape, trained to a strict
  # local minimum (scipy's trust-region Newton, float64), where A = H_d + (λ/m)·C
  # is positive definite as CG needs. Multipliers 1 on the kernels, ½ on the
  # hidden biases, 0 on the output bias (whose data curvature is 2).
  rng = np.random.default_rng(0)
  lam, m = 0.1, 32
  mask = {"w1": 1.0, "b1": 0.5, "w2": 1.0, "b2": 0.0}
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(32, 3)))
    teacher = {
      "w1": jnp.asarray(rng.normal(size=(3, 8))), "b1": jnp.asarray(rng.normal(size=8) / 2),
      "w2": jnp.asarray(rng.normal(size=8)), "b2": jnp.zeros(()),
    }  # fmt: skip
    y = _mlp(teacher, x) + 0.05 * jnp.asarray(rng.normal(size=32))

    def train(p: Any) -> jax.Array:
      return jnp.mean((_mlp(p, x) - y) ** 2)

    w0, unravel = jax.flatten_util.ravel_pytree(teacher)
    objective = jax.jit(lambda v: jaxl2.regularized(train, lam, m, mask=mask)(unravel(v)))
    grad, hessian = jax.jit(jax.grad(objective)), jax.jit(jax.hessian(objective))
    fitted = scipy.optimize.minimize(
      objective, np.asarray(w0), jac=grad, hess=hessian, method="trust-exact",
      options={"gtol": 1e-10},
    )  # fmt: skip
    # Stationary to rounding, and a strict minimum (trust-exact may stop on rounding
    # with success False once the gradient is at that level).
    assert np.linalg.norm(grad(fitted.x)) < 1e-8
    assert np.linalg.eigvalsh(hessian(fitted.x)).min() > 1e-4
    params = unravel(jnp.asarray(fitted.x))
    exact = jaxl2.effective_params(train, params, lam, m, mask=mask)
    estimate = jaxl2.effective_params(train, params, lam, m, mask=mask, exact_below=0, probes=256)
  assert exact.exact and not estimate.exact and estimate.probes == 256
  # The check means something only if the error bar is tight: under 5% of the value.
  assert 0 < estimate.stderr < 0.05 * exact.value
  assert abs(estimate.value - exact.value) <= 3 * estimate.stderr


# ---- tune_lam -----------------------------------------------------------------


def _tune_ridge(lam0_over_opt: float, **options: Any) -> tuple[Any, ...]:
  """`tune_lam` on float64 ridge from ``lam0_over_opt``·λ_opt: data, λ_opt and the result."""
  x, y, xv, yv = data = _ridge_data(m=100, d=10, seed=3)
  # λ_opt: the root of the closed form's dV/dλ, to machine precision.
  lam_opt = scipy.optimize.brentq(lambda t: _ridge_val(x, y, xv, yv, np.exp(t))[1], 0.0, 8.0)
  lam_opt = float(np.exp(lam_opt))
  with jax.enable_x64(True), warnings.catch_warnings():
    # From λ_opt/100, 300 SGD steps do not reach W* at the smallest λ (tune_lam warns
    # once); the hypergradient's sign is still right there, and later steps are exact.
    warnings.simplefilter("ignore", RuntimeWarning)
    train, val = _ridge_losses(*map(jnp.asarray, data))
    start = {"b": jnp.zeros(()), "w": jnp.zeros(x.shape[1])}
    result = jaxl2.tune_lam(
      train, val, start, lam0_over_opt * lam_opt, len(y), mask=RIDGE_MASK,
      optimizer=optax.sgd(0.05), train_steps=300, **options,
    )  # fmt: skip
  return data, lam_opt, result


def _assert_params_are_the_closed_form(data: tuple[Any, ...], lam: float, params: Any) -> None:
  sol = _ridge_closed_form(data[0], data[1], lam)
  # Reference: w*(λ), b*(λ) in float64 NumPy; 300 warm SGD steps reach them to ~1e-7.
  np.testing.assert_allclose(np.asarray(params["w"]), sol["w"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(float(params["b"]), sol["b"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("off", [100.0, 0.01])
def test_tune_lam_reaches_the_closed_form_minimizer_of_ridge(off):
  data, lam_opt, result = _tune_ridge(off)
  assert result.converged
  assert abs(np.log(result.lam) - np.log(lam_opt)) <= 0.05  # the tolerance
  assert result.val_loss == pytest.approx(_ridge_val(*data, result.lam)[0], rel=1e-6)
  _assert_params_are_the_closed_form(data, result.lam, result.params)
  # Every step of the path records dV/dλ at its own λ: the closed form's, float64, where
  # training had reached W* (stationarity; the first step from λ_opt/100 had not).
  for step in result.path:
    if step.stationarity < 1e-3:
      assert step.hypergradient == pytest.approx(_ridge_val(*data, step.lam)[1], rel=1e-3)
      assert step.val_loss == pytest.approx(_ridge_val(*data, step.lam)[0], rel=1e-5)


def test_tune_lam_stopped_by_max_iter_returns_the_best_of_its_path():
  # From λ_opt/100, the sixth λ overshoots the minimum: the fifth is the best of the path,
  # and λ*, its validation loss and its params must be the fifth's, not the last's.
  data, _, result = _tune_ridge(0.01, max_iter=6)
  assert len(result.path) == 6 and not result.converged
  closed_form = [_ridge_val(*data, step.lam)[0] for step in result.path]  # reference, float64
  best = result.path[int(np.argmin(closed_form))]
  assert best != result.path[-1]  # else this test does not test the choice
  assert result.lam == best.lam
  assert result.val_loss == pytest.approx(min(closed_form), rel=1e-6)
  _assert_params_are_the_closed_form(data, result.lam, result.params)


def test_tune_lam_on_digits_beats_a_sixteen_point_sweep():
  data = jaxl2.load_digits(train_size=200, val_size=500, seed=0)
  xt, yt, xv, yv = map(jnp.asarray, data)

  def apply(p: Any, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]

  def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def init(key: Any) -> dict[str, jax.Array]:
    return {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

  optimizer = optax.adam(0.05)
  grid = jaxl2.sweep(
    init, apply, xent, optimizer, (xt, yt), (xv, yv), lams=np.logspace(-3, 2, 16), steps=1500
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # float32 Adam: W* is approximate
    result = jaxl2.tune_lam(
      lambda p: xent(apply(p, xt), yt), lambda p: xent(apply(p, xv), yv), init(None), 1.0, 200,
      optimizer=optimizer, train_steps=300,
    )  # fmt: skip
  best = float(np.min(grid.val_loss))
  assert result.val_loss <= best  # reference: the best of the 16-point grid
  # ... and that validation loss is the one of the params returned (the user's own function).
  assert float(xent(apply(result.params, xv), yv)) == pytest.approx(result.val_loss, rel=1e-6)


# ---- errors and warnings ------------------------------------------------------


def test_not_stationary_params_warn():
  x, y, xv, yv = map(jnp.asarray, _ridge_data())
  train, val = _ridge_losses(x, y, xv, yv)
  params = {"b": jnp.zeros(()), "w": jnp.ones(x.shape[1])}
  with pytest.warns(RuntimeWarning, match="not a stationary point"):
    jaxl2.lam_hypergradient(train, val, params, 1.0, len(y), mask=RIDGE_MASK)


def test_negative_curvature_warns():
  # A saddle: −w₀² + w₁² has H = diag(−2, 2) + λ/m; CG meets pᵀHp < 0.
  def train(p: Any) -> jax.Array:
    return -(p["w"][0] ** 2) + p["w"][1] ** 2

  params = {"w": jnp.zeros(2)}
  with pytest.warns(RuntimeWarning, match="not positive definite"):
    hg = jaxl2.lam_hypergradient(
      train, lambda p: jnp.sum(p["w"]), params, 1.0, 10, mask=jaxl2.all_floating
    )
  assert hg.negative_curvature


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"lam0": 0.0}, ValueError, "`lam0` must be > 0"),
    ({"train_steps": 0}, ValueError, "`train_steps` must be an integer >= 1"),
    ({"rtol": -1.0}, ValueError, "`rtol` must be a finite number > 0"),
  ],
)
def test_tune_lam_rejects_bad_options(kwargs, error, match):
  options = {"lam0": 1.0, "train_steps": 10, **kwargs}
  lam0 = options.pop("lam0")
  with pytest.raises(error, match=match):
    jaxl2.tune_lam(
      lambda p: jnp.sum(p["w"] ** 2), lambda p: jnp.sum(p["w"]), {"w": jnp.ones((2, 2))}, lam0,
      10, optimizer=optax.sgd(0.1), **options,
    )  # fmt: skip


def test_integer_leaves_are_rejected_by_name():
  params = {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match="'step'"):
    jaxl2.effective_params(lambda p: jnp.sum(p["w"] ** 2), params, 1.0, 4)
