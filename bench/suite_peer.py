"""Peer suite: the same SGD + L2 step in PyTorch on the CPU, when torch is importable.

Same MLP (784-1024-1024-10), batch and thread count as the train suite; torch
uses ``SGD(weight_decay=λ/m)`` with a weights group (decayed) and a biases
group (not decayed), the equivalent of `jaxl2.add_l2_grad`. torch is an
optional extra: without it the suite is skipped with a printed note.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from typing import Any

from bench import suite_train
from bench.timing import measure


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  try:
    import torch
  except ImportError:
    print("  peer: torch is not importable; skipped (pip install torch to run it)", flush=True)
    return [{"case": "torch", "skipped": "torch is not importable"}]
  import jax
  import optax

  import jaxl2

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  name, params, loss, (x, y) = suite_train._mlp_case(quick)
  tx = optax.chain(jaxl2.add_l2_grad(suite_train.LAM, suite_train.M), optax.sgd(suite_train.LR))
  jax_step = measure(suite_train._step(loss, tx), params, tx.init(params), x, y, repeats=repeats)

  widths = [x.shape[1], *[params[f"Dense_{i}"]["bias"].shape[0] for i in range(len(params))]]
  layers: list[torch.nn.Module] = []
  for i, (a, b) in enumerate(itertools.pairwise(widths)):
    layers.append(torch.nn.Linear(a, b))
    if i < len(widths) - 2:
      layers.append(torch.nn.ReLU())
  net = torch.nn.Sequential(*layers)
  weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
  biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
  opt = torch.optim.SGD(
    [
      {"params": weights, "weight_decay": jaxl2.to_weight_decay(suite_train.LAM, suite_train.M)},
      {"params": biases, "weight_decay": 0.0},
    ],
    lr=suite_train.LR,
  )
  tx_in = torch.from_numpy(jax.device_get(x).copy())
  ty = torch.from_numpy(jax.device_get(y).astype("int64"))
  lossf = torch.nn.CrossEntropyLoss()

  def torch_step() -> None:
    opt.zero_grad(set_to_none=True)
    lossf(net(tx_in), ty).backward()
    opt.step()

  for _ in range(3):  # warm-up, excluded
    torch_step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch_step()
    times.append(time.perf_counter() - start)
  torch_s = statistics.median(times)
  row = {
    "case": name,
    "threads": threads,
    "torch_version": torch.__version__,
    "jaxl2_ms": 1e3 * jax_step["median_s"],
    "torch_ms": 1e3 * torch_s,
    "jaxl2_vs_torch": jax_step["median_s"] / torch_s,
  }
  print(
    f"  peer {name}: jaxl2 {row['jaxl2_ms']:.2f} ms vs torch {row['torch_ms']:.2f} ms "
    f"= {row['jaxl2_vs_torch']:.2f}x",
    flush=True,
  )
  return [row]
