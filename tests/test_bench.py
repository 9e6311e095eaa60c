"""Smoke test: every benchmark suite runs at tiny sizes (no timing is asserted)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from bench import summarize

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_suite_runs_quick(tmp_path):
  out = subprocess.run(
    [sys.executable, "bench/run.py", "--quick", "--repeats", "2", "--out", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  (result,) = tmp_path.glob("*.json")
  report = json.loads(result.read_text())
  assert set(report["results"]) == {
    "penalty", "grad", "train", "peer", "sweep", "precision", "multidevice", "verify", "hyper",
  }  # fmt: skip
  for row in report["results"]["verify"]:
    assert row["median_s"] > 0 and row["x_jit_grad"] > 0
  assert report["machine"]["versions"]["jax"]
  for row in report["results"]["penalty"]:
    assert row["jaxl2_ms"] > 0 and row["limit_ms"] > 0
    assert row["jaxl2_vs_best_peer"] > 0 and row["jaxl2_compile_vs_naive"] > 0
    # The peers sum exactly the leaves jaxl2's default mask selects, real trees included.
    assert 0 < row["selected"] < row["leaves"] or row["case"].startswith("leaves")
  cases = {row["case"] for row in report["results"]["penalty"]}
  assert {"vit-tiny", "gemma-stacked-tiny"} <= cases
  steps = {(row["case"], row["step"]) for row in report["results"]["grad"]}
  assert steps == {(case, step) for case in cases for step in ("grad", "update")}
  table = summarize.summary([report], ["quick"])
  assert all(f"| {case} | {step} |" in table for case, step in steps)
  assert {row["mesh"] for row in report["results"]["multidevice"]} == {"explicit", "auto"}
  for row in report["results"]["multidevice"]:
    # 8 replicated devices take one device's plan: the same reductions, the same sum.
    if "eight_vs_one" in row:
      assert row["eight_devices_reductions"] == row["one_device_reductions"] > 0
      assert row["value_rel_diff"] <= 1e-6
    else:
      assert 0 < row["jaxl2_reductions"] < row["naive_reductions"]
  for row in report["results"]["precision"]:
    # Accuracy is not timing: the float32 accumulation must hold at any size.
    assert row["jaxl2_rel_error"] < 1e-6
    if row["case"].startswith("float16"):
      assert row["naive_rel_error"] == float("inf")  # fp16 squares overflow in fp16
  assert (tmp_path / result.name.replace(".json", ".md")).read_text().startswith("# jaxl2")
