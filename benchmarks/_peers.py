"""The peer libraries as the benchmark scripts call them: hessian-eigenthings on Hugging Face causal LMs.

The peer is imported from wherever Python finds it: an installed wheel (on a GPU machine
``pip install --no-deps .device_wheels/hessian_eigenthings-1.0.0a6-py3-none-any.whl``) or a
source tree on ``PYTHONPATH`` (``PYTHONPATH=../shared/peers/hessian-eigenthings-a6``). Its
version is read from the imported module (``__version__``), not from the installed
distribution's metadata: a source tree on ``PYTHONPATH`` shadows an older installed wheel.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch


def load_eigenthings(require: str | None = None) -> tuple[ModuleType | None, dict[str, str]]:
    """Import hessian-eigenthings if it is importable.

    Parameters
    ----------
    require : str, optional
        A version the imported module must report (``"1.0.0a6"``); default None: any.

    Returns
    -------
    module : module or None
        ``hessian_eigenthings``, or None when it is not importable.
    info : dict of str to str
        ``version`` and ``path`` of the imported module (``"not installed"`` when absent).

    Raises
    ------
    RuntimeError
        If ``require`` is given and the peer is missing or reports another version.
    """
    try:
        import hessian_eigenthings as he
    except ImportError:
        if require:
            raise RuntimeError(f"hessian-eigenthings {require} is required but not importable") from None
        return None, {"version": "not installed", "path": ""}
    info = {"version": str(getattr(he, "__version__", "unknown")), "path": str(he.__file__)}
    if require and info["version"] != require:
        raise RuntimeError(
            f"hessian-eigenthings {require} is required, found {info['version']} at {info['path']}"
        )
    return he, info


def eigenthings_operators(model: torch.nn.Module, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """hessian-eigenthings' GGN and Hessians on ``batches`` of a Hugging Face causal LM.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face causal LM (``model(**batch).logits``, ``.loss`` with ``labels``).
    batches : list of dict
        Batches with ``input_ids`` of shape (B, T); the labels are the inputs (shifted inside
        the peer's Hugging Face loss helpers, as in :class:`curvops.lm.CausalLMLoss`).

    Returns
    -------
    dict of str to operator
        Empty when the peer is not importable, else ``eigenthings_ggn`` (its default GGN: a
        finite-difference JVP, an analytic loss Hessian and one backward),
        ``eigenthings_hessian`` (autograd double backward) and ``eigenthings_hessian_fd``
        (central differences of gradients with its default step). Each has
        ``matvec(v)`` for a torch vector ``v`` of shape (D,). It weights every batch
        equally: the same objective as the curvops operators for batches of equal size.
    """
    he, _ = load_eigenthings()
    if he is None:
        return {}
    labelled = [{**b, "labels": b["input_ids"]} for b in batches]
    return {
        "eigenthings_ggn": he.GGNOperator(model, labelled, he.hf_lm_forward(), he.hf_lm_loss_of_output()),
        "eigenthings_hessian": he.HessianOperator(model, labelled, he.hf_lm_loss()),
        "eigenthings_hessian_fd": he.HessianOperator(
            model, labelled, he.hf_lm_loss(), method="finite_difference"
        ),
    }
