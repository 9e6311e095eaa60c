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


def _affine(p: Any, x: jax.Array) -> jax.Array:
  return x @ p["w"] + p["b"]


def _mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean((outputs - targets) ** 2)


def _ridge_state(params: Any, lam: float, m: int, *, mask: Any = RIDGE_MASK, optimizer=None):
  """The ridge model as `make_train_step` takes it (simple form), and its state at ``params``."""
  train = jaxl2.make_train_step(
    _affine, _mse, optimizer or optax.sgd(0.05), lam=lam, m=m, mask=mask
  )
  return train, train.init(params)


def _as_jnp(*arrays: Any) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(a) for a in arrays)


@pytest.mark.parametrize("lam", [0.5, 8.0, 60.0])
def test_ridge_hypergradient_is_the_closed_form_derivative(lam):
  x, y, xv, yv = _ridge_data()
  sol = _ridge_closed_form(x, y, lam)
  _, expected = _ridge_val(x, y, xv, yv, lam)
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")  # W* is exact: no stationarity or solver warning
    data, val = _as_jnp(x, y), _as_jnp(xv, yv)
    params = {"b": jnp.asarray(sol["b"]), "w": jnp.asarray(sol["w"])}
    train, state = _ridge_state(params, lam, len(y))
    # damping=0: the exact implicit derivative (the default damps by 1% of λ/m).
    hg = jaxl2.lam_hypergradient(train, state, data, val, damping=0.0)
    damped = jaxl2.lam_hypergradient(train, state, data, val)
  # Reference: dV/dλ of the closed form, float64; 5e-9 relative (float64 CG to tol 1e-10).
  assert hg.value == pytest.approx(expected, rel=5e-9)
  assert hg.residual <= 1e-10 and hg.stationarity < 1e-8 and not hg.negative_curvature
  assert hg.val_loss == pytest.approx(_ridge_val(x, y, xv, yv, lam)[0], rel=1e-12)
  # Gauss-Newton is the Hessian for a model linear in its params; the default damping
  # δ = 0.01·λ/m moves the value by less than 1%.
  assert hg.curvature == "gauss_newton" and damped.damping == pytest.approx(0.01 * lam / len(y))
  assert damped.value == pytest.approx(expected, rel=1e-2)


def test_ridge_hypergradient_uses_the_mask_multiplier():
  # A multiplier c on w is λ·c in the closed form: dV/dλ = c·V'(c·λ).
  x, y, xv, yv = _ridge_data(seed=1)
  lam, c = 6.0, 0.25
  sol = _ridge_closed_form(x, y, c * lam)
  _, slope = _ridge_val(x, y, xv, yv, c * lam)
  with jax.enable_x64(True):
    params = {"b": jnp.asarray(sol["b"]), "w": jnp.asarray(sol["w"])}
    train, state = _ridge_state(params, lam, len(y), mask={"b": 0.0, "w": c})
    hg = jaxl2.lam_hypergradient(
      train, state, _as_jnp(x, y), _as_jnp(xv, yv), damping=0.0, curvature="hessian"
    )
  assert hg.value == pytest.approx(c * slope, rel=5e-9)  # closed form, float64


def test_numpy_float64_params_without_x64_are_solved_in_float32():
  # 64-bit disabled: NumPy float64 leaves are computed in float32 as JAX computes them,
  # with float32's default tol (float64's 1e-10 is out of a float32 solve's reach).
  x, y, xv, yv = _ridge_data()
  lam = 8.0
  sol = _ridge_closed_form(x, y, lam)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "float64 is not available" truncation, no solver warning
    train, state = _ridge_state({"b": np.float64(sol["b"]), "w": sol["w"]}, lam, len(y))
    hg = jaxl2.lam_hypergradient(train, state, _as_jnp(x, y), _as_jnp(xv, yv), damping=0.0)
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
    params = {"b": jnp.zeros(()), "w": jnp.zeros(x.shape[1])}
    mask = RIDGE_MASK if intercept else {"b": True, "w": True}
    if not intercept:  # b held at 0 and out of the params: the affine model without it
      params = {"w": params["w"]}
    train = jaxl2.make_train_step(
      (lambda p, a: a @ p["w"] + p.get("b", 0.0)), _mse, optax.sgd(0.1), lam=lam, m=len(y),
      mask=mask if intercept else {"w": True},
    )  # fmt: skip
    state = train.init(params)
    result = jaxl2.effective_params(train, state, (xj, yj), damping=0.0)
    in_batches = jaxl2.effective_params(train, state, (xj, yj), damping=0.0, batch_size=7)
  assert result.exact and result.stderr == 0.0
  assert result.value == pytest.approx(expected, rel=1e-8)  # float64
  # Curvature summed over batches of 7 (8 full ones and a remainder of 4): the same trace.
  assert in_batches.value == pytest.approx(result.value, rel=1e-12)


def test_effective_params_falls_as_lam_grows():
  x, y, _, _ = _ridge_data()
  with jax.enable_x64(True):
    params = {"b": jnp.zeros(()), "w": jnp.zeros(x.shape[1])}
    values = []
    for lam in (0.0, 1.0, 100.0, 1e6):
      train, state = _ridge_state(params, lam, len(y))
      values.append(jaxl2.effective_params(train, state, _as_jnp(x, y), damping=0.0).value)
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


def _bce(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jax.nn.softplus(logits) - y * logits)


def _newton_solve(objective: Any, v: jax.Array, iters: int = 50) -> jax.Array:
  """The minimum of ``objective`` near ``v`` by Newton's method on the dense Hessian (float64).

  Independent of jaxl2's CG: a direct solve per step, run until the gradient is at
  rounding level (every objective here is strictly convex near its minimum).
  """
  grad = jax.jit(jax.grad(objective))
  step = jax.jit(lambda u: u - jnp.linalg.solve(jax.hessian(objective)(u), jax.grad(objective)(u)))
  for _ in range(iters):
    v = step(v)
    if float(jnp.linalg.norm(grad(v))) < 1e-14:
      break
  return v


@pytest.mark.parametrize("lam", [0.5, 5.0])
def test_logistic_hypergradient_matches_central_differences(lam):
  with jax.enable_x64(True):
    x, y, xv, yv = _as_jnp(*_logistic_problem())
    m = len(y)

    def solve(at: float) -> dict[str, jax.Array]:
      def objective(v: jax.Array) -> jax.Array:
        return _bce(x @ v[1:] + v[0], y) + at / (2 * m) * jnp.sum(v[1:] ** 2)

      v = _newton_solve(objective, jnp.zeros(5))
      return {"b": v[0], "w": v[1:]}

    train = jaxl2.make_train_step(_affine, _bce, optax.sgd(0.1), lam=lam, m=m, mask=RIDGE_MASK)
    hg = jaxl2.lam_hypergradient(train, train.init(solve(lam)), (x, y), (xv, yv), damping=0.0)
    h = 1e-2 * lam
    v = {d: float(_bce(_affine(solve(lam + d * h), xv), yv)) for d in (-2, -1, 1, 2)}
  # Five-point central difference: truncation O(h⁴) ≈ 1e-8 relative, rounding ≈ 1e-13/h.
  finite_difference = (8 * (v[1] - v[-1]) - (v[2] - v[-2])) / (12 * h)
  assert hg.value == pytest.approx(finite_difference, rel=1e-7)
  assert hg.curvature == "gauss_newton"  # exact here: the model is linear in its params


# ---- a small MLP: Hutchinson within 3 standard errors of exact ----------------


def _mlp(p: Any, x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _fitted_mlp(lam: float, m: int, mask: Any) -> tuple[Any, ...]:
  """A 3-8-1 tanh MLP fitted to a teacher of its shape, at a strict minimum (float64).

  scipy's trust-region Newton on the regularized objective; returns x, y and W*.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(m, 3)))
  teacher = {
    "w1": jnp.asarray(rng.normal(size=(3, 8))), "b1": jnp.asarray(rng.normal(size=8) / 2),
    "w2": jnp.asarray(rng.normal(size=8)), "b2": jnp.zeros(()),
  }  # fmt: skip
  y = _mlp(teacher, x) + 0.05 * jnp.asarray(rng.normal(size=m))
  w0, unravel = jax.flatten_util.ravel_pytree(teacher)

  def objective(v: jax.Array) -> jax.Array:
    p = unravel(v)
    return _mse(_mlp(p, x), y) + jaxl2.l2_penalty(p, lam, m, mask=mask)

  grad, hessian = jax.jit(jax.grad(objective)), jax.jit(jax.hessian(objective))
  fitted = scipy.optimize.minimize(
    jax.jit(objective), np.asarray(w0), jac=grad, hess=hessian, method="trust-exact",
    options={"gtol": 1e-10},
  )  # fmt: skip
  # Stationary to rounding, and a strict minimum (trust-exact may stop on rounding
  # with success False once the gradient is at that level).
  assert np.linalg.norm(grad(fitted.x)) < 1e-8
  assert np.linalg.eigvalsh(hessian(fitted.x)).min() > 1e-4
  return x, y, unravel(jnp.asarray(fitted.x))


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_mlp_hutchinson_estimate_is_within_three_standard_errors_of_exact(curvature):
  # Multipliers 1 on the kernels, ½ on the hidden biases, 0 on the output bias.
  lam, m = 0.1, 32
  mask = {"w1": 1.0, "b1": 0.5, "w2": 1.0, "b2": 0.0}
  with jax.enable_x64(True):
    x, y, params = _fitted_mlp(lam, m, mask)
    train = jaxl2.make_train_step(_mlp, _mse, optax.sgd(0.1), lam=lam, m=m, mask=mask)
    state = train.init(params)
    options = {"curvature": curvature, "damping": 0.0}
    exact = jaxl2.effective_params(train, state, (x, y), **options)
    estimate = jaxl2.effective_params(
      train, state, (x, y), exact_below=0, probes=256, batch_size=10, **options
    )
  assert exact.exact and not estimate.exact and estimate.probes == 256
  assert exact.curvature == estimate.curvature == curvature
  # The check means something only if the error bar is tight: under 5% of the value.
  assert 0 < estimate.stderr < 0.05 * exact.value
  assert abs(estimate.value - exact.value) <= 3 * estimate.stderr


def test_gauss_newton_trace_is_the_explicit_jacobian_form():
  # Reference, float64 NumPy: G = Jᵀ·H_out·J with J = ∂f/∂W from jax.jacobian on the flat
  # params and H_out = ∇² of the loss in the outputs; tr(G·(G + (λ/m)·diag(c))⁻¹).
  lam, m = 0.1, 32
  mask = {"w1": 1.0, "b1": 0.5, "w2": 1.0, "b2": 0.0}
  with jax.enable_x64(True):
    x, y, params = _fitted_mlp(lam, m, mask)
    w, unravel = jax.flatten_util.ravel_pytree(params)
    jac = np.asarray(jax.jacobian(lambda v: _mlp(unravel(v), x))(w))  # (m, n)
    h_out = np.asarray(jax.hessian(lambda o: _mse(o, y))(_mlp(params, x)))  # (m, m)
    c = np.concatenate(
      [np.full(np.size(params[k]), mask[k]) for k in sorted(params)]  # ravel_pytree's order
    )
    train = jaxl2.make_train_step(_mlp, _mse, optax.sgd(0.1), lam=lam, m=m, mask=mask)
    got = jaxl2.effective_params(
      train, train.init(params), (x, y), curvature="gauss_newton", damping=0.0, batch_size=5
    )
  g = jac.T @ h_out @ jac
  expected = np.trace(np.linalg.pinv(g + lam / m * np.diag(c)) @ g)
  assert got.exact and got.value == pytest.approx(expected, rel=1e-9)


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
    start = {"b": jnp.zeros(()), "w": jnp.zeros(x.shape[1])}
    train, state = _ridge_state(start, lam0_over_opt * lam_opt, len(y))
    result = jaxl2.tune_lam(
      train, state, _as_jnp(x, y), _as_jnp(xv, yv), train_steps=300, damping=0.0, **options
    )
  return data, lam_opt, result


def _assert_params_are_the_closed_form(data: tuple[Any, ...], lam: float, params: Any) -> None:
  sol = _ridge_closed_form(data[0], data[1], lam)
  # Reference: w*(λ), b*(λ) in float64 NumPy; 300 warm SGD steps reach them to ~1e-7.
  np.testing.assert_allclose(np.asarray(params["w"]), sol["w"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(float(params["b"]), sol["b"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("off", [100.0, 0.01])
def test_tune_lam_reaches_the_closed_form_minimizer_of_ridge(off):
  data, lam_opt, result = _tune_ridge(off)
  assert result.converged and result.reason.startswith("converged")
  assert abs(np.log(result.lam) - np.log(lam_opt)) <= 0.05  # the tolerance
  assert result.val_loss == pytest.approx(_ridge_val(*data, result.lam)[0], rel=1e-6)
  _assert_params_are_the_closed_form(data, result.lam, result.params)
  assert result.state.params is result.params and float(result.state.lam) == result.lam
  # Every step of the path records dV/dλ at its own λ: the closed form's, float64, to the
  # accuracy W* was trained to (the implicit derivative's error is first order in the
  # stationarity, on the scale S of dV/dλ; the first step from λ_opt/100 had not reached W*).
  slopes = [_ridge_val(*data, step.lam)[1] for step in result.path]
  scale = max(abs(x) for x in slopes)
  for step, slope in zip(result.path, slopes, strict=True):
    if step.stationarity < 1e-3:
      assert step.hypergradient == pytest.approx(slope, abs=step.stationarity * scale)
      assert step.val_loss == pytest.approx(_ridge_val(*data, step.lam)[0], rel=1e-5)


def test_tune_lam_stopped_by_max_iter_returns_the_best_of_its_path():
  # From λ_opt/100, the sixth λ overshoots the minimum: the fifth is the best of the path,
  # and λ*, its validation loss and its params must be the fifth's, not the last's.
  data, _, result = _tune_ridge(0.01, max_iter=6)
  assert len(result.path) == 6 and not result.converged and "max_iter" in result.reason
  closed_form = [_ridge_val(*data, step.lam)[0] for step in result.path]  # reference, float64
  best = result.path[int(np.argmin(closed_form))]
  assert best != result.path[-1]  # else this test does not test the choice
  assert result.lam == best.lam
  assert result.val_loss == pytest.approx(min(closed_form), rel=1e-6)
  _assert_params_are_the_closed_form(data, result.lam, result.params)


def test_tune_lam_on_digits_beats_a_sixteen_point_sweep():
  data = jaxl2.load_digits(train_size=200, val_size=500, seed=0)
  xt, yt, xv, yv = map(jnp.asarray, data)

  def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def init(key: Any) -> dict[str, jax.Array]:
    return {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

  optimizer = optax.adam(0.05)
  grid = jaxl2.sweep(
    init, _affine, xent, optimizer, (xt, yt), (xv, yv), lams=np.logspace(-3, 2, 16), steps=1500
  )
  train = jaxl2.make_train_step(_affine, xent, optimizer, lam=1.0, m=200)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # float32 Adam: W* is approximate
    result = jaxl2.tune_lam(train, train.init(init(None)), (xt, yt), (xv, yv), train_steps=300)
  best = float(np.min(grid.val_loss))
  assert result.val_loss <= best  # reference: the best of the 16-point grid
  # ... and that validation loss is the one of the params returned (the user's own function).
  assert float(xent(_affine(result.params, xv), yv)) == pytest.approx(result.val_loss, rel=1e-6)


def _ridge_start(lam0: float, m: int = 50, optimizer: Any = None) -> tuple[Any, ...]:
  x, y, xv, yv = _ridge_data(m=m, d=5, seed=2)
  start = {"b": jnp.zeros(()), "w": jnp.zeros(5)}
  train, state = _ridge_state(start, lam0, m, optimizer=optimizer or optax.sgd(0.1))
  return train, state, _as_jnp(x, y), _as_jnp(xv, yv)


def test_tune_lam_recovers_from_a_diverged_first_lambda():
  # λ0 = 1e4, m = 50, sgd(0.1): lr·λ/m = 20 > 2, the penalty alone makes SGD blow up.
  # The run returned λ* = 1e4 with a NaN validation loss; λ ≤ 1e3 trains fine.
  train, state, data, val = _ridge_start(1e4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    result = jaxl2.tune_lam(train, state, data, val, train_steps=200, max_iter=12)
  assert result.path[0].diverged and result.path[0].val_loss == np.inf
  assert not any(s.diverged for s in result.path[-3:])  # it moved down and trained
  assert np.isfinite(result.val_loss) and result.lam < 1e3
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(result.params))
  # The reported validation loss is that of the params returned (closed form, float32).
  assert float(_mse(_affine(result.params, val[0]), val[1])) == pytest.approx(
    result.val_loss, rel=1e-5
  )


def test_tune_lam_stops_at_the_lower_bound_and_says_why():
  # Validation set = training set: any λ > 0 only hurts, dV/dλ > 0 everywhere.
  train, state, data, _ = _ridge_start(1.0)
  result = jaxl2.tune_lam(
    train, state, data, data, train_steps=200, lam_bounds=(1e-3, 1e3), max_iter=20
  )
  assert not result.converged and "λ_min" in result.reason
  assert result.path[-1].lam == pytest.approx(1e-3, rel=1e-9)
  assert len(result.path) <= 12  # it did not spin at the bound


def _saddle_step() -> tuple[jaxl2.TrainStep, Any]:
  # −w₀² + w₁²: from w = 0 the gradient is 0, so training stays at the saddle, where
  # H = diag(−2, 2) + λ/m and CG meets pᵀHp < 0 at its first direction.
  def loss(p: Any, s: Any, batch: Any, key: Any) -> Any:
    return -(p["w"][0] ** 2) + p["w"][1] ** 2 + 0 * jnp.sum(batch), (s, {})

  def val(p: Any, s: Any, batch: Any, key: Any) -> Any:
    return jnp.sum(p["w"]) + 0 * jnp.sum(batch), (s, {})

  train = jaxl2.make_train_step(None, loss, optax.sgd(0.1), lam=1.0, m=10, mask=jaxl2.all_floating)
  return train, val


def test_negative_curvature_warns_and_is_never_called_converged():
  train, val = _saddle_step()
  state, batch = train.init({"w": jnp.zeros(2)}), jnp.zeros((4, 1))
  with pytest.warns(RuntimeWarning, match="not positive definite"):
    hg = jaxl2.lam_hypergradient(train, state, batch, batch, val_loss_fn=val)
  assert hg.negative_curvature and hg.value == 0 and hg.curvature == "hessian"
  with pytest.warns(RuntimeWarning, match="approximate"):
    result = jaxl2.tune_lam(train, state, batch, batch, val_loss_fn=val, train_steps=5)
  # The hypergradient is 0 there (the solve stopped before moving): not convergence.
  assert not result.converged and "unreliable" in result.reason


def test_not_stationary_params_warn():
  x, y, xv, yv = _as_jnp(*_ridge_data())
  train, state = _ridge_state({"b": jnp.zeros(()), "w": jnp.ones(x.shape[1])}, 1.0, len(y))
  with pytest.warns(RuntimeWarning, match="not a stationary point"):
    jaxl2.lam_hypergradient(train, state, (x, y), (xv, yv))


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"lam0": 0.0}, ValueError, "`lam0` must lie within `lam_bounds`"),
    ({"train_steps": 0}, ValueError, "`train_steps` must be an integer >= 1"),
    ({"rtol": -1.0}, ValueError, "`rtol` must be a finite number > 0"),
    ({"lam_bounds": (1.0, 0.1)}, ValueError, "`lam_bounds` must be a tuple"),
    ({"batch_size": 0}, ValueError, r"`batch_size` must be in \[1, 50\]"),
    ({"curvature": "fisher"}, ValueError, "`curvature` must be one of"),
    ({"damping": -1.0}, ValueError, "`damping` must be a finite number >= 0"),
  ],
)
def test_tune_lam_rejects_bad_options(kwargs, error, match):
  train, state, data, val = _ridge_start(1.0)
  with pytest.raises(error, match=match):
    jaxl2.tune_lam(train, state, data, val, **{"train_steps": 10, **kwargs})


def test_the_old_closure_form_gets_a_pointed_error():
  with pytest.raises(TypeError, match=r"takes the model as `jaxl2\.make_train_step` does"):
    jaxl2.lam_hypergradient(lambda p: 0.0, lambda p: 0.0, {"w": jnp.ones(2)}, 1.0)


def test_gauss_newton_is_for_the_form_that_can_split_the_loss():
  train, state, data, val = _ridge_start(1.0)
  with pytest.raises(ValueError, match="pass `curvature='gauss_newton'`"):
    jaxl2.lam_hypergradient(train, state, data, val, curvature=jaxl2.GaussNewton(_affine, _mse))
  general, _ = _saddle_step()
  with pytest.raises(ValueError, match=r"pass `curvature=jaxl2.GaussNewton\("):
    jaxl2.lam_hypergradient(
      general, general.init({"w": jnp.zeros(2)}), data[0], val[0], curvature="gauss_newton"
    )


def test_integer_leaves_are_rejected_by_name():
  params = {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
  train = jaxl2.make_train_step(
    lambda p, x: x @ p["w"], _mse, optax.sgd(0.1), lam=1.0, m=4, mask={"w": True, "step": False}
  )
  with pytest.raises(TypeError, match="'step'"):
    jaxl2.effective_params(train, train.init(params), (jnp.ones((4, 2)), jnp.ones((4, 2))))
