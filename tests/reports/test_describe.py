"""describe: the table of what is penalized."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jaxl2
from tests import helpers


def test_rows_totals_and_penalty_match_reference():
  params = helpers.randomize(helpers.linen_cnn_variables(0), seed=7)
  d = jaxl2.describe(params, lam=0.2, m=30)
  by_path = {r.path: r for r in d.rows}
  kernel = by_path["params/Conv_0/kernel"]
  assert kernel.selected and kernel.multiplier == 1.0 and kernel.shape == (3, 3, 1, 4)
  assert kernel.size == 36 and kernel.dtype == "float32"
  np.testing.assert_allclose(
    kernel.sq_norm, helpers.ref_sq_norm(params["params"]["Conv_0"]["kernel"]), rtol=1e-12
  )
  assert not by_path["params/LayerNorm_0/scale"].selected
  assert not by_path["params/Dense_0/bias"].selected
  selected = [w for p, w in helpers.leaves_by_path(params).items() if p.endswith("kernel")]
  assert d.params_selected == sum(w.size for w in selected)
  assert d.params_total == sum(w.size for w in helpers.leaves_by_path(params).values())
  np.testing.assert_allclose(
    d.penalty, helpers.ref_l2([(w, 1.0) for w in selected], 0.2, 30), rtol=1e-12
  )
  # The float64 table agrees with the float32 penalty to float32 precision.
  np.testing.assert_allclose(float(jaxl2.l2_penalty(params, 0.2, 30)), d.penalty, rtol=1e-6)


def test_table_text_shows_exclusions_at_a_glance():
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "step": jnp.int32(0)}
  text = str(jaxl2.describe(params, lam=1.0, m=2))
  lines = text.splitlines()
  assert lines[0].split() == [
    "path", "shape", "dtype", "size", "selected", "mult", "‖W‖²", "why",
  ]  # fmt: skip
  row = {line.split()[0]: line.split() for line in lines[2:5]}
  assert row["dense/kernel"][1:5] == ["2x3", "float32", "6", "yes"]
  assert row["dense/bias"][4] == "no" and row["dense/bias"][-1] == "bias"
  assert (
    row["step"][4] == "no" and row["step"][6] == "-" and row["step"][-2:] == ["not", "floating"]
  )
  assert "penalized: 1 of 3 leaves, 6 of 10 parameters (60.0%)" in text
  assert "penalty (λ/2m)·Σ c·‖W‖² with λ=1, m=2: 1.5" in text


def test_empty_selection_is_shown_not_raised():
  d = jaxl2.describe({"b": jnp.ones(3)})
  assert d.n_selected == 0 and "nothing is selected" in str(d)


def test_nnx_variable_types_are_shown():
  text = str(jaxl2.describe(helpers.nnx_net(0)))
  assert "bn/mean [BatchStat]" in text and "[RngKey]" in text


def test_multipliers_are_reported():
  mask = jaxl2.by_regex({r".*kernel": 0.5})
  d = jaxl2.describe({"k": {"kernel": jnp.full((2, 2), 2.0)}}, mask=mask, lam=1.0, m=1.0)
  assert d.rows[0].multiplier == 0.5
  np.testing.assert_allclose(d.weighted_sq_norm, 8.0, rtol=0)
  np.testing.assert_allclose(d.penalty, 4.0, rtol=0)


def test_html_table_for_notebooks():
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "a<b": jnp.ones((2, 2))}
  page = jaxl2.describe(params, lam=1.0, m=2)._repr_html_()
  assert page.startswith("<table>") and page.count("<tr>") == 1 + 3
  assert "<th>why</th>" in page and "<td>dense/kernel</td>" in page
  assert "a&lt;b" in page and "a<b" not in page  # paths are escaped
  assert "penalized: 2 of 3 leaves" in page


def test_equinox_function_fields_are_rows_of_no_parameters():
  import equinox as eqx
  import jax

  mlp = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.key(0))
  rows = {r.path: r for r in jaxl2.describe(mlp).rows}
  assert rows["activation"].why == "not an array (Equinox field)"
  assert rows["activation"].size == 0 and not rows["activation"].selected
  assert jaxl2.describe(mlp).params_total == sum(
    w.size for w in jax.tree_util.tree_leaves(eqx.filter(mlp, eqx.is_array))
  )


def test_why_names_the_pattern_that_matched():
  params = {
    "enc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    "head": {"kernel": jnp.ones((2, 1))},
  }
  mask = jaxl2.by_regex({r"head/.*": 0.5, r".*/kernel": 1.0})
  rows = {r.path: r for r in jaxl2.describe(params, mask=mask).rows}
  assert rows["head/kernel"].why == "pattern 'head/.*'" and rows["head/kernel"].multiplier == 0.5
  assert rows["enc/kernel"].why == "pattern '.*/kernel'"
  assert rows["enc/bias"].why == "no pattern matched" and not rows["enc/bias"].selected
