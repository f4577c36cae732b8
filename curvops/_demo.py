"""The built-in example of ``curvops spectrum``: a small MLP trained on scikit-learn's digits.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1,797 8x8 images of handwritten
digits, 10 classes), so the example runs on a fresh machine without any download. Only the
command line and the notebooks use this module; ``import curvops`` does not import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Hidden layer widths of the demo MLP (64 -> 32 -> 32 -> 10, D = 3,466 parameters).
HIDDEN = (32, 32)
NUM_CLASSES = 10
NUM_FEATURES = 64


@dataclass(frozen=True)
class DigitsData:
    """The digits data set split into a training and a test part.

    Attributes
    ----------
    x_train, x_test : Tensor
        Pixel intensities scaled to ``[0, 1]``, shape (N, 64).
    y_train, y_test : Tensor
        Class labels 0..9 (int64), shape (N,).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> DigitsData:
    """Load scikit-learn's digits, scale pixels to ``[0, 1]`` and split at random.

    Parameters
    ----------
    test_fraction : float, optional
        Share of the 1,797 images held out for testing (default 0.2).
    seed : int, optional
        Seed of the random split (default 0).
    dtype : torch.dtype, optional
        Floating-point type of the pixel intensities (default float32).
    device : torch.device or str, optional
        Device of every tensor (default ``"cpu"``).

    Returns
    -------
    DigitsData
        Training and test inputs (N, 64) and labels (N,).

    Raises
    ------
    ImportError
        If scikit-learn is not installed (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # the demo needs it, the library does not
        raise ImportError("the built-in example needs scikit-learn: pip install scikit-learn") from error
    images, labels = load_digits(return_X_y=True)
    # Pixel values are integers 0..16; scaling keeps the inputs O(1), so the Hessian's scale
    # comes from the network, not from the raw pixel units.
    x = torch.as_tensor(images / 16.0, dtype=dtype, device=device)
    y = torch.as_tensor(labels, dtype=torch.int64, device=device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator).to(device)
    num_test = int(round(test_fraction * x.shape[0]))
    test, train = order[:num_test], order[num_test:]
    return DigitsData(x[train], y[train], x[test], y[test])


def digits_mlp(
    hidden: tuple[int, ...] = HIDDEN,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Sequential:
    """A tanh MLP 64 -> hidden -> 10 with weights drawn from ``seed``.

    tanh (rather than ReLU) has nonzero second derivatives, so the Hessian differs from the
    GGN by more than the output layer's contribution: the comparison is informative.

    Parameters
    ----------
    hidden : tuple of int, optional
        Widths of the hidden layers (default ``HIDDEN``, ``(32, 32)``).
    seed : int, optional
        Seed of torch's global generator for the initial weights (default 0).
    dtype : torch.dtype, optional
        Floating-point type of the weights (default float32).
    device : torch.device or str, optional
        Device of the weights (default ``"cpu"``).

    Returns
    -------
    nn.Sequential
        ``Linear, Tanh, ..., Linear`` with 10 outputs (logits).
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = NUM_FEATURES
    for size in hidden:
        layers += [nn.Linear(width, size), nn.Tanh()]
        width = size
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train with Adam on cross-entropy, then put the model in eval mode.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits (N, C); trained in place.
    x : Tensor, shape (N, ...)
        Training inputs (all of them; shuffled every epoch with ``seed``).
    y : Tensor, shape (N,)
        Class labels.
    epochs : int
        Passes over the data (0 leaves the weights untouched).
    batch_size : int, optional
        Samples per Adam step (default 64).
    lr : float, optional
        Adam learning rate (default 1e-2).
    seed : int, optional
        Seed of the shuffling (default 0).
    progress : bool, optional
        Show a tqdm progress bar on stderr over all steps (default False).

    Returns
    -------
    list of float
        The mean training loss of every epoch.
    """
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    bar = _bar(total=epochs * steps_per_epoch, desc="training", unit="step", enabled=progress)
    history: list[float] = []
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[index]), y[index])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * index.numel()
                bar.update(1)
            history.append(total / x.shape[0])
            bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}")
    finally:
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits (N, C).
    x : Tensor, shape (N, ...)
        Inputs.
    y : Tensor, shape (N,)
        Class labels.

    Returns
    -------
    tuple of (float, float)
        The mean cross-entropy and the fraction of correct argmax predictions.
    """
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    accuracy = float((logits.argmax(1) == y).double().mean())
    return loss, accuracy


class _NoBar:
    """Stand-in for a tqdm bar when progress display is off (or tqdm is missing)."""

    def update(self, n: int = 1) -> None:
        """Do nothing."""

    def set_postfix(self, **kwargs: Any) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def _bar(*, total: int | None, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm progress bar on stderr, or a silent stand-in."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: progress is a convenience, not a result
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True)
