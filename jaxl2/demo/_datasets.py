"""Scikit-learn's bundled digits set, split for a regularization experiment (no download)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["N_DIGITS", "Digits", "check_train_size", "load_digits"]

N_DIGITS = 1797  # images in scikit-learn's digits set


class Digits(NamedTuple):
  """A train/validation split of the 8x8 digits (1,797 images, 10 classes).

  Features are pixel intensities scaled to [0, 1] (float32, 64 per image);
  labels are int32 in 0..9.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray


def check_train_size(train_size: Any) -> None:
  """Checks a digits training size: an integer in [1, N_DIGITS - 1] (validation needs some)."""
  if (
    isinstance(train_size, bool)
    or not isinstance(train_size, int)
    or not 1 <= train_size < N_DIGITS
  ):
    raise ValueError(
      f"`train_size` must be an integer in [1, {N_DIGITS - 1}] (the digits set has "
      f"{N_DIGITS} images and validation needs some); got {train_size!r}."
    )


def load_digits(*, train_size: int = 200, val_size: int | None = None, seed: int = 0) -> Digits:
  """Loads scikit-learn's digits and draws a random train/validation split.

  A small ``train_size`` makes an unregularized MLP overfit, which is the
  point of the experiment. The validation set is the rest (or ``val_size``
  images of it).

  Args:
    train_size: number of training images, 1 ≤ train_size < 1,797.
    val_size: number of validation images; default all that remain.
    seed: seed of the random split.

  Raises:
    ImportError: scikit-learn is not installed (``pip install "jaxl2[demo]"``).
    ValueError: sizes out of range.

  Example:
    >>> import jaxl2
    >>> data = jaxl2.load_digits(train_size=100, val_size=50)
    >>> data.x_train.shape, data.y_val.shape
    ((100, 64), (50,))
  """
  try:
    from sklearn.datasets import load_digits as sk_load_digits
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('jaxl2.load_digits needs scikit-learn: pip install "jaxl2[demo]"') from err
  check_train_size(train_size)
  images, labels = sk_load_digits(return_X_y=True)
  n = len(labels)
  remaining = n - train_size
  if val_size is None:
    val_size = remaining
  if isinstance(val_size, bool) or not isinstance(val_size, int) or not 1 <= val_size <= remaining:
    raise ValueError(
      f"`val_size` must be an integer in [1, {remaining}] (the images left after "
      f"{train_size} training images); got {val_size!r}."
    )
  order = np.random.default_rng(seed).permutation(n)
  train, val = order[:train_size], order[train_size : train_size + val_size]
  x = (images / 16.0).astype(np.float32)
  y = labels.astype(np.int32)
  return Digits(x[train], y[train], x[val], y[val])
