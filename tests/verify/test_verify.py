"""verify_penalty / verify_update: planted regularization mistakes, each diagnosed by name.

Everything runs in float32, as users run it. Tolerances: a correct setup must
come out ``ok`` at the default ``rtol=1e-3``; measured factors are asserted to
rtol 1e-5 for penalties and SGD (exact up to float32 rounding) and 1e-3 for
Adam (a small-perturbation response).
"""

from __future__ import annotations

import html
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2
from tests import helpers, real_models

LAM, M, BATCH, LR = 0.5, 1000.0, 32, 0.05


def _paths(tree):
  return list(helpers.leaves_by_path(tree))


def _mlp():
  """Linen MLP (zero-initialized biases), its params and its mean-squared data loss."""
  params, _, _, _, data_loss = helpers.mlp_problem(n=BATCH)
  return params, data_loss


def _sum_sq(params, keep):
  """Σ‖W‖² over the leaves whose path passes ``keep``, written as users write it."""
  leaves = helpers.leaves_by_path(params)
  return sum(jnp.sum(w**2) for path, w in leaves.items() if keep(path))


def _statuses(report):
  return {row.path: row.status for row in report.rows}


def _row(report, path):
  (row,) = [row for row in report.rows if row.path == path]
  return row


def _kernels(report):
  return [row for row in report.rows if row.path.endswith("kernel")]


# ---- verify_penalty: correct setups are ok -----------------------------------------


def test_jaxl2_regularized_is_ok():
  params, data_loss = _mlp()
  report = jaxl2.verify_penalty(
    lambda p, lam: jaxl2.regularized(data_loss, lam, M)(p), params, LAM, M
  )
  assert report.ok, str(report)
  assert report.verdict.startswith("OK: 3 of 6 leaves penalized")
  for row in _kernels(report):
    np.testing.assert_allclose(row.factor, 1.0, rtol=1e-5)  # float32 rounding only
    assert row.misfit < 1e-5


def test_hand_written_penalty_is_ok_where_a_float32_difference_is_noise():
  # λ/m = 1e-9: the penalty gradient is ~1e-8 of the data gradient, far below
  # float32 resolution, yet d/dλ of the gradient sees it exactly.
  params, data_loss = _mlp()
  lam, m = 6e-5, 60_000.0

  def loss(p, lam):
    return data_loss(p) + lam / (2 * m) * _sum_sq(p, lambda path: path.endswith("kernel"))

  naive = jax.tree_util.tree_map(
    lambda a, b: a - b, jax.grad(loss)(params, lam), jax.grad(loss)(params, 0.0)
  )
  intended = jaxl2.l2_penalty_grad(params, lam, m)
  kernel = ("Dense_0", "kernel")
  error = np.abs(naive[kernel[0]][kernel[1]] - intended[kernel[0]][kernel[1]]).max()
  assert error > 0.5 * np.abs(intended[kernel[0]][kernel[1]]).max()  # the difference is noise

  report = jaxl2.verify_penalty(loss, params, lam, m)
  assert report.ok, str(report)
  for row in _kernels(report):
    np.testing.assert_allclose(row.factor, 1.0, rtol=1e-5)


def test_multipliers_are_part_of_the_intent():
  params, data_loss = _mlp()
  mask = jaxl2.by_regex({r".*kernel": 1.0, r".*bias": 0.25})
  report = jaxl2.verify_penalty(
    lambda p, lam: jaxl2.regularized(data_loss, lam, M, mask=mask)(p), params, LAM, M, mask=mask
  )
  assert report.ok, str(report)
  assert _row(report, "Dense_0/bias").intended == 0.25
  np.testing.assert_allclose(_row(report, "Dense_0/bias").found, 0.25, rtol=1e-5)


def test_nnx_module_is_ok():
  model = helpers.nnx_net()
  x = jnp.ones((4, 5))

  def loss(module, lam):
    return jnp.mean(module(x) ** 2) + jaxl2.l2_penalty(module, lam, M)

  report = jaxl2.verify_penalty(loss, model, LAM, M)
  assert report.ok, str(report)
  assert {"dense1/kernel", "dense2/kernel", "bn/scale"} <= set(_statuses(report))
  # Checked on the module's nnx.Param state: running statistics are state, not parameters.
  assert "bn/mean" not in _statuses(report)
  assert not any("count" in path or "key" in path for path in _statuses(report))  # not floats


def test_float64_is_ok():
  with jax.enable_x64(True):
    params, _, _, _, data_loss = helpers.mlp_problem(dtype=jnp.float64)
    report = jaxl2.verify_penalty(
      lambda p, lam: jaxl2.regularized(data_loss, lam, M)(p), params, LAM, M
    )
  assert report.ok, str(report)
  for row in _kernels(report):
    np.testing.assert_allclose(row.factor, 1.0, rtol=1e-12)


# ---- verify_penalty: planted mistakes ------------------------------------------------


def test_decayed_bias_is_unexpected_even_at_zero_init():
  params, data_loss = _mlp()  # biases are zeros here: the check redraws them
  assert not np.any(params["Dense_0"]["bias"])

  def loss(p, lam):
    return data_loss(p) + lam / (2 * M) * _sum_sq(p, lambda path: True)

  report = jaxl2.verify_penalty(loss, params, LAM, M)
  assert not report.ok
  for path, status in _statuses(report).items():
    assert status == ("unexpected" if path.endswith("bias") else "ok"), path
  bias = _row(report, "Dense_1/bias")
  np.testing.assert_allclose(bias.found, 1.0, rtol=1e-5)
  assert "a bias is penalized" in bias.note
  assert report.verdict == "FAILED: 3 of 6 leaves wrong (3 unexpected)."


def test_decayed_layernorm_scale_is_unexpected():
  variables = helpers.linen_cnn_variables()
  params, stats = variables["params"], variables["batch_stats"]
  x = jax.random.normal(jax.random.key(0), (BATCH, 6, 6, 1))

  def loss(p, lam):
    out = helpers.CNN().apply({"params": p, "batch_stats": stats}, x)
    user_mask = jaxl2.by_regex(r".*(kernel|LayerNorm_0/scale)")  # the scale slipped in
    return jnp.mean(out**2) + jaxl2.l2_penalty(p, lam, M, mask=user_mask)

  report = jaxl2.verify_penalty(loss, params, LAM, M)
  failures = {row.path: row for row in report.failures}
  assert list(failures) == ["LayerNorm_0/scale"]
  assert failures["LayerNorm_0/scale"].status == "unexpected"
  assert "a norm scale is penalized" in failures["LayerNorm_0/scale"].note
  assert _statuses(report)["BatchNorm_0/scale"] == "ok"


def test_user_mask_that_matches_nothing():
  params, data_loss = _mlp()

  def loss(p, lam):  # linen calls it "kernel", not "weight": nothing is penalized
    return data_loss(p) + lam / (2 * M) * _sum_sq(p, lambda path: re.fullmatch(".*/weight", path))

  report = jaxl2.verify_penalty(loss, params, LAM, M)
  assert {row.status for row in _kernels(report)} == {"missing"}
  assert report.verdict.startswith("FAILED: no leaf is penalized: a mask that matches nothing?")


def test_intended_mask_that_matches_nothing_raises():
  params, data_loss = _mlp()
  nothing = jaxl2.by_name("weight", strict=False)
  with pytest.raises(ValueError, match="selected no parameters"):
    jaxl2.verify_penalty(lambda p, lam: data_loss(p), params, LAM, M, mask=nothing)


def test_factor_two_is_named():
  params, data_loss = _mlp()

  def loss(p, lam):  # the ½ is missing
    return data_loss(p) + lam / M * _sum_sq(p, lambda path: path.endswith("kernel"))

  report = jaxl2.verify_penalty(loss, params, LAM, M)
  for row in _kernels(report):
    assert row.status == "scaled"
    np.testing.assert_allclose(row.factor, 2.0, rtol=1e-5)
    assert row.note == "λ/m used instead of λ/2m"


def _batch_normalized_loss(data_loss):
  def loss(p, lam):  # divided by the batch size, not by the training-set size
    return data_loss(p) + lam / (2 * BATCH) * _sum_sq(p, lambda path: path.endswith("kernel"))

  return loss


def test_batch_size_normalization_is_named():
  params, data_loss = _mlp()
  report = jaxl2.verify_penalty(_batch_normalized_loss(data_loss), params, LAM, M, batch_size=BATCH)
  for row in _kernels(report):
    assert row.status == "scaled"
    np.testing.assert_allclose(row.factor, M / BATCH, rtol=1e-5)
    assert "normalized by the batch size" in row.note
    assert row.note.startswith("λ/2b used instead of λ/2m")


def test_batch_factor_without_batch_size_is_just_scaled():
  params, data_loss = _mlp()
  report = jaxl2.verify_penalty(_batch_normalized_loss(data_loss), params, LAM, M)
  row = _kernels(report)[0]
  assert row.status == "scaled"
  np.testing.assert_allclose(row.factor, M / BATCH, rtol=1e-5)
  assert "×31.25 the intended strength" in row.note
  assert "pass `batch_size=`" in row.note


def test_l1_instead_of_l2_differs():
  params, data_loss = _mlp()

  def loss(p, lam):
    return data_loss(p) + jaxl2.l1_penalty(p, lam, M)

  report = jaxl2.verify_penalty(loss, params, LAM, M)
  for row in _kernels(report):
    assert row.status == "differs"
    assert "not proportional to (λ/m)·W" in row.note


def test_non_finite_penalty_gradient_differs():
  params = {"w": -jnp.ones((2, 2))}
  report = jaxl2.verify_penalty(lambda p, lam: lam * jnp.sum(jnp.sqrt(p["w"])), params, LAM, M)
  assert _statuses(report) == {"w": "differs"}
  assert "non-finite" in report.rows[0].note


# ---- verify_update ---------------------------------------------------------------------


def _mask(params):
  return helpers.kernel_mask(params)


@pytest.mark.parametrize(
  ("name", "make"),
  [
    (
      "add_decayed_weights + sgd",
      lambda p: (
        optax.chain(
          optax.add_decayed_weights(jaxl2.to_weight_decay(LAM, M), _mask(p)), optax.sgd(LR)
        ),
        optax.sgd(LR),
      ),
    ),
    (
      "add_decayed_weights + sgd with momentum",
      lambda p: (
        optax.chain(
          optax.add_decayed_weights(jaxl2.to_weight_decay(LAM, M), _mask(p)),
          optax.sgd(LR, momentum=0.9),
        ),
        optax.sgd(LR, momentum=0.9),
      ),
    ),
    (
      "add_l2_grad + adam",
      lambda p: (optax.chain(jaxl2.add_l2_grad(LAM, M), optax.adam(LR)), optax.adam(LR)),
    ),
    (
      "add_decayed_weights + adam",
      lambda p: (
        optax.chain(
          optax.add_decayed_weights(jaxl2.to_weight_decay(LAM, M), _mask(p)), optax.adam(LR)
        ),
        optax.adam(LR),
      ),
    ),
    (
      "decoupled decay under plain sgd is coupled L2",
      lambda p: (
        optax.chain(
          optax.sgd(LR), optax.add_decayed_weights(-LR * jaxl2.to_weight_decay(LAM, M), _mask(p))
        ),
        optax.sgd(LR),
      ),
    ),
  ],
)
def test_correct_updates_are_ok(name, make):
  params, _ = _mlp()
  tx, base_tx = make(params)
  report = jaxl2.verify_update(tx, base_tx, params, LAM, M)
  assert report.ok, f"{name}\n{report}"
  for row in _kernels(report):
    np.testing.assert_allclose(row.factor, 1.0, rtol=1e-5)


@pytest.mark.parametrize(
  "make",
  [
    lambda wd, mask: optax.adamw(LR, weight_decay=wd, mask=mask),
    lambda wd, mask: optax.chain(
      optax.scale_by_adam(), optax.add_decayed_weights(wd, mask), optax.scale(-LR)
    ),
  ],
  ids=["adamw", "add_decayed_weights after scale_by_adam"],
)
def test_decoupled_decay_under_adam_differs(make):
  params, _ = _mlp()
  tx = make(jaxl2.to_weight_decay(LAM, M), _mask(params))
  report = jaxl2.verify_update(tx, optax.adam(LR), params, LAM, M)
  assert not report.ok
  for row in _kernels(report):
    assert row.status == "differs"
    assert row.note.startswith("decoupled decay")
  assert {row.status for row in report.rows if row.path.endswith("bias")} == {"ok"}


def test_decay_added_after_adam_has_the_wrong_sign_under_sgd():
  params, _ = _mlp()
  tx = optax.chain(
    optax.sgd(LR), optax.add_decayed_weights(jaxl2.to_weight_decay(LAM, M), _mask(params))
  )
  report = jaxl2.verify_update(tx, optax.sgd(LR), params, LAM, M)
  for row in _kernels(report):
    assert row.status == "scaled"
    np.testing.assert_allclose(row.factor, -1 / LR, rtol=1e-5)
    assert "opposite sign" in row.note


@pytest.mark.parametrize(("base", "rtol"), [(optax.sgd(LR), 1e-5), (optax.adam(LR), 1e-3)])
def test_wrong_rate_is_scaled(base, rtol):
  params, _ = _mlp()
  wd = 2 * jaxl2.to_weight_decay(LAM, M)
  report = jaxl2.verify_update(
    optax.chain(optax.add_decayed_weights(wd, _mask(params)), base), base, params, LAM, M
  )
  for row in _kernels(report):
    assert row.status == "scaled"
    np.testing.assert_allclose(row.factor, 2.0, rtol=rtol)
    assert row.note == "2λ/m used instead of λ/m"


def test_batch_size_rate_is_named():
  params, _ = _mlp()
  tx = optax.chain(optax.add_decayed_weights(LAM / BATCH, _mask(params)), optax.sgd(LR))
  report = jaxl2.verify_update(tx, optax.sgd(LR), params, LAM, M, batch_size=BATCH)
  for row in _kernels(report):
    assert row.status == "scaled"
    assert "λ/b used instead of λ/m (normalized by the batch size" in row.note


def test_decayed_bias_and_missing_decay_in_updates():
  params, _ = _mlp()
  wd = jaxl2.to_weight_decay(LAM, M)
  unmasked = optax.chain(optax.add_decayed_weights(wd), optax.sgd(LR))
  report = jaxl2.verify_update(unmasked, optax.sgd(LR), params, LAM, M)
  assert {row.status for row in report.failures} == {"unexpected"}
  assert all("a bias is decayed" in row.note for row in report.failures)

  report = jaxl2.verify_update(optax.sgd(LR), optax.sgd(LR), params, LAM, M)
  assert report.verdict.startswith("FAILED: no leaf is decayed: a mask that matches nothing?")


def test_user_grads_are_the_ones_compared():
  params, _ = _mlp()
  grads = helpers.randomize(params, seed=3)
  tx = optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(LR))
  assert jaxl2.verify_update(tx, optax.sgd(LR), params, LAM, M, grads=grads).ok
  # Under Adam, coupled L2's effect on the update scales as 1/|g| and a decoupled decay's
  # does not, so the factor found for AdamW scales with the gradients given: ×100 for
  # 100·grads. Reference: that ratio, to rtol 1e-2 (the decay itself, (λ/m)·|W| ≲ 5e-3·|g|
  # here, is part of the gradient Adam normalizes).
  adamw = optax.adamw(LR, weight_decay=jaxl2.to_weight_decay(LAM, M), mask=_mask(params))

  def factors(g):
    report = jaxl2.verify_update(adamw, optax.adam(LR), params, LAM, M, grads=g)
    return np.array([row.factor for row in _kernels(report)])

  scaled = jax.tree_util.tree_map(lambda g: 100 * g, grads)
  np.testing.assert_allclose(factors(scaled) / factors(grads), 100.0, rtol=1e-2)


def test_sign_based_optimizers_are_unverified():
  params, _ = _mlp()
  # Lion uses only the sign of the gradient: a small decay changes nothing to compare.
  lion = optax.chain(jaxl2.add_l2_grad(LAM, M), optax.lion(LR))
  report = jaxl2.verify_update(lion, optax.lion(LR), params, LAM, M)
  # Nothing wrong was seen, and nothing was verified: not ok.
  assert not report.ok
  assert {row.status for row in _kernels(report)} == {"unverified"}
  assert all(row.note.startswith("untestable") for row in _kernels(report))
  assert report.verdict.startswith("UNVERIFIED:") and "untestable" in report.verdict
  with pytest.raises(ValueError, match="UNVERIFIED"):
    report.raise_if_failed()


# ---- the report ------------------------------------------------------------------------


def test_report_str_ok_and_raise_if_failed():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}

  def loss(p, lam):
    return lam / (2 * M) * _sum_sq(p, lambda path: True)

  report = jaxl2.verify_penalty(loss, params, LAM, M)
  assert report.ok is False
  text = str(report)
  lines = text.splitlines()
  assert lines[0].startswith("verify_penalty:") and "λ=0.5, m=1000, rtol=0.001" in lines[0]
  assert lines[1].split() == ["path", "shape", "intended", "found", "status", "note"]
  assert re.search(r"dense/bias\s+2\s+-\s+1\s+unexpected\s+a bias is penalized", text)
  assert re.search(r"dense/kernel\s+3x2\s+1\s+1\s+ok", text)
  assert lines[-1] == report.verdict == "FAILED: 1 of 2 leaves wrong (1 unexpected)."
  with pytest.raises(ValueError) as info:
    report.raise_if_failed()
  assert str(info.value) == text

  good = jaxl2.verify_penalty(lambda p, lam: jaxl2.l2_penalty(p, lam, M), params, LAM, M)
  assert good.ok is True
  assert good.failures == ()
  good.raise_if_failed()  # no error
  assert isinstance(good, jaxl2.VerifyReport)
  assert all(isinstance(row, jaxl2.VerifyRow) for row in good.rows)


# ---- bad inputs --------------------------------------------------------------------------


_PARAMS = {"w": jnp.ones((2, 2))}


def _ok_loss(p, lam):
  return jaxl2.l2_penalty(p, lam, M)


@pytest.mark.parametrize(
  ("call", "error", "message"),
  [
    (lambda: jaxl2.verify_penalty(1.0, _PARAMS, LAM, M), TypeError, "`loss_fn` must be callable"),
    (lambda: jaxl2.verify_penalty(_ok_loss, _PARAMS, -1.0, M), ValueError, "`lam` must be"),
    (lambda: jaxl2.verify_penalty(_ok_loss, _PARAMS, "1", M), TypeError, "`lam` must be a real"),
    (lambda: jaxl2.verify_penalty(_ok_loss, _PARAMS, LAM, 0), ValueError, "`m` (the number"),
    (lambda: jaxl2.verify_penalty(_ok_loss, _PARAMS, LAM, M, rtol=2.0), ValueError, "`rtol`"),
    (
      lambda: jaxl2.verify_penalty(_ok_loss, _PARAMS, LAM, M, batch_size=0),
      ValueError,
      "`batch_size` must be a positive integer",
    ),
    (
      lambda: jaxl2.verify_penalty(
        lambda p, lam: jnp.where(lam > 0, 1.0, 0.0) * jnp.sum(p["w"]) if lam > 0 else 0.0,
        _PARAMS,
        LAM,
        M,
      ),
      TypeError,
      "must be differentiable in `lam`",
    ),
    (
      lambda: jaxl2.verify_update(optax.sgd(LR).update, optax.sgd(LR), _PARAMS, LAM, M),
      TypeError,
      "`tx` must be an optax GradientTransformation",
    ),
    (
      lambda: jaxl2.verify_update(optax.sgd(LR), None, _PARAMS, LAM, M),
      TypeError,
      "`base_tx` must be an optax GradientTransformation",
    ),
    (
      lambda: jaxl2.verify_update(optax.sgd(LR), optax.sgd(LR), _PARAMS, LAM, -1.0),
      ValueError,
      "`m` (the number",
    ),
    (
      lambda: jaxl2.verify_update(
        optax.sgd(LR), optax.sgd(LR), _PARAMS, LAM, M, grads={"v": jnp.ones((2, 2))}
      ),
      ValueError,
      "`grads` must have the structure of `params`",
    ),
  ],
)
def test_bad_inputs(call, error, message):
  with pytest.raises(error, match=re.escape(message)):
    call()


def test_tied_nnx_weights_verified_once():
  from flax import nnx

  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.encoder = nnx.Linear(4, 4, rngs=rngs)
      self.decoder = nnx.Linear(4, 4, rngs=rngs)
      self.decoder.kernel = self.encoder.kernel

    def __call__(self, x):
      return self.decoder(nnx.relu(self.encoder(x)))

  model = Tied(nnx.Rngs(0))
  x = jnp.ones((3, 4))

  def right(mdl, lam):
    return jnp.mean(mdl(x) ** 2) + jaxl2.l2_penalty(mdl, lam, M)

  def twice(mdl, lam):  # a hand-written sum over both attributes counts the tie twice
    sq = jnp.sum(mdl.encoder.kernel[...] ** 2) + jnp.sum(mdl.decoder.kernel[...] ** 2)
    return jnp.mean(mdl(x) ** 2) + lam / (2 * M) * sq

  ok = jaxl2.verify_penalty(right, model, LAM, M)
  assert ok.ok, str(ok)
  assert [r.path for r in ok.rows if r.path.endswith("kernel")] == ["decoder/kernel"]
  bad = jaxl2.verify_penalty(twice, model, LAM, M)
  row = next(r for r in bad.rows if r.path == "decoder/kernel")
  assert row.status == "scaled" and abs(row.found - 2.0) < 1e-3


# ---- the form of λ, and λ = 0 ------------------------------------------------------------


@pytest.mark.parametrize(("lam", "power"), [(0.5, 2), (2.0, 2)])
def test_penalty_with_lam_to_a_power_is_caught_at_the_lam_given(lam, power):
  params, data_loss = _mlp()

  def loss(p, lam_):  # λ^p/(2m)·Σ‖W‖²: at λ = 0.5, p = 2, its rate in λ looks right
    return data_loss(p) + lam_**power / (2 * M) * _sum_sq(p, lambda path: "kernel" in path)

  report = jaxl2.verify_penalty(loss, params, lam, M)
  assert not report.ok
  form = {2: "λ²"}[power]
  for row in _kernels(report):
    # The gradient at λ is λ^(p−1)·(λ/m)·W: a factor λ^(p−1), exact for quadratics.
    np.testing.assert_allclose(row.found, lam ** (power - 1), rtol=1e-4)
    assert row.status in ("scaled", "differs") and f"λ enters as {form}?" in row.note


def test_penalty_that_ignores_the_lam_passed_is_caught():
  params, data_loss = _mlp()

  def loss(p, lam_):  # a λ baked in at another value; the argument is ignored
    del lam_
    return data_loss(p) + jaxl2.l2_penalty(p, 0.1, M)

  report = jaxl2.verify_penalty(loss, params, LAM, M)
  assert {row.status for row in _kernels(report)} == {"missing"}
  assert all("λ ignored, a constant baked in?" in row.note for row in _kernels(report))
  assert "ignores its `lam`" in report.verdict


@pytest.mark.parametrize("check", ["penalty", "update"])
def test_lam_zero_is_unverified_not_ok(check):
  params, data_loss = _mlp()
  if check == "penalty":
    report = jaxl2.verify_penalty(
      lambda p, lam: data_loss(p) + jaxl2.l2_penalty(p, lam, M), params, 0.0, M
    )
  else:
    tx = optax.chain(jaxl2.add_l2_grad(0.0, M), optax.sgd(LR))
    report = jaxl2.verify_update(tx, optax.sgd(LR), params, 0.0, M)
  assert not report.ok
  assert report.verdict.startswith("UNVERIFIED: λ = 0")
  # No row reads "ok" (nor another reason to be unverified) under that verdict.
  assert {(row.status, row.note) for row in report.rows} == {
    ("unverified", "λ = 0: nothing to verify")
  }
  with pytest.raises(ValueError, match="UNVERIFIED: λ = 0"):
    report.raise_if_failed()


def test_lam_zero_keeps_a_wrong_term_it_found():
  # At λ = 0 the rate in λ still shows a penalized bias: that row stays "unexpected".
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  report = jaxl2.verify_penalty(
    lambda p, lam: jaxl2.l2_penalty(p, lam, M, mask=jaxl2.all_floating), params, 0.0, M
  )
  assert {row.path: row.status for row in report.rows} == {"b": "unexpected", "w": "unverified"}
  assert report.verdict.startswith("UNVERIFIED: λ = 0")


@pytest.mark.parametrize(
  ("loss_fn", "why"),
  [
    (lambda p, x, y: jnp.sum(p["w"]), "missing a required argument: 'y'"),
    (lambda p: jnp.sum(p["w"]), "too many positional arguments"),
  ],
  ids=["data-as-arguments", "no-lam"],
)
def test_loss_of_the_wrong_signature_names_the_contract(loss_fn, why):
  with pytest.raises(TypeError) as info:
    jaxl2.verify_penalty(loss_fn, _PARAMS, LAM, M)
  message = str(info.value)
  assert message.startswith("`loss_fn` must be callable as `loss_fn(params, lam)`")
  assert why in message and "lambda params, lam: my_loss(params, x, y, lam)" in message


# ---- frozen leaves and decay that rounds away -----------------------------------------


def _frozen_embedding_setup():
  """lm1b-style linen params whose token embedding is frozen by `multi_transform`."""
  params = helpers.randomize(real_models.linen_lm1b().params, seed=4, scale=0.1)
  labels = jax.tree_util.tree_map_with_path(
    lambda kp, _: "frozen" if "Embed_0" in jax.tree_util.keystr(kp) else "train", params
  )
  freeze = optax.multi_transform({"train": optax.identity(), "frozen": optax.set_to_zero()}, labels)
  return params, freeze, optax.chain(freeze, optax.scale(-LR))


def test_decay_on_a_frozen_embedding_is_flagged():
  params, freeze, base = _frozen_embedding_setup()
  wd = jaxl2.to_weight_decay(LAM, M)
  # The decay added after the freezing transform reaches the frozen table too.
  decay = optax.add_decayed_weights(wd, mask=_kernel_and_embedding_mask(params))
  after = optax.chain(freeze, decay, optax.scale(-LR))
  report = jaxl2.verify_update(after, base, params, LAM, M)
  statuses = _statuses(report)
  assert statuses["decoder/Embed_0/embedding"] == "frozen-decayed"
  assert not report.ok and "frozen-decayed" in report.verdict
  assert {s for p, s in statuses.items() if "Embed_0" not in p} == {"ok"}
  # Decay placed before the freezing transform: the frozen table is left alone.
  before = optax.chain(jaxl2.add_l2_grad(LAM, M), freeze, optax.scale(-LR))
  report = jaxl2.verify_update(before, base, params, LAM, M)
  assert report.ok, str(report)
  assert _row(report, "decoder/Embed_0/embedding").note == "frozen by `base_tx`: not decayed"


def _kernel_and_embedding_mask(params):
  selected = {r.path for r in jaxl2.describe(params).rows if r.selected}
  return jax.tree_util.tree_map_with_path(
    lambda kp, _: "/".join(str(getattr(k, "key", k)) for k in kp) in selected, params
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_decay_below_half_an_ulp_of_low_precision_weights_rounds_away(dtype):
  params = jax.tree_util.tree_map(lambda w: w.astype(dtype), _mlp()[0])
  lr = 1e-3
  tiny = optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(lr))  # lr·λ/m = 5e-7 ≪ 2^-9
  report = jaxl2.verify_update(tiny, optax.sgd(lr), params, LAM, M)
  assert {row.status for row in _kernels(report)} == {"rounds-away"}
  note = _kernels(report)[0].note
  assert note.startswith("rounds away: the decay per step is 5e-07·|w|") and dtype.__name__ in note
  assert not report.ok
  # lr·λ/m = 0.05: well above half an ulp, nothing is lost.
  big = optax.chain(jaxl2.add_l2_grad(100.0, M), optax.sgd(0.5))
  assert jaxl2.verify_update(big, optax.sgd(0.5), params, 100.0, M).ok


def test_report_renders_as_an_html_table():
  params, data_loss = _mlp()
  report = jaxl2.verify_penalty(
    jaxl2.regularized(lambda p, lam: data_loss(p), LAM, M), params, LAM, M
  )
  page = report._repr_html_()
  assert "<th>status</th>" in page and page.count("<tr>") == 1 + len(report.rows)
  assert "verify_penalty:" in page and html.escape(report.verdict) in page
