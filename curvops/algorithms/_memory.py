"""Working-memory plans of the randomized algorithms: how many length-``D`` columns fit.

Each algorithm's working memory is dominated by ``(D, c)`` blocks, so its model is a count of
columns: ``bytes = columns * D * itemsize``. A block product ``A @ X`` of ``c`` columns is
charged ``PRODUCT_COLUMNS`` ``* c`` columns: ``X``, the product, and parameter-sized
temporaries per column inside a curvature operator (the gradient-shaped tensors of a Hessian
or GGN product). The budget defaults to ``DEFAULT_FRACTION`` of the memory available on
the operator's device when the algorithm starts (the rest is left to the operator's model,
data and autograd graph); a public ``memory_budget=`` overrides it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

#: Columns charged per column of a block product ``A @ X`` (see the module docstring).
PRODUCT_COLUMNS = 4
#: Share of the device's available memory an algorithm plans to use by default.
DEFAULT_FRACTION = 0.5


def qr_workspace_columns(operand: Any, width: int) -> float:
    """Columns of workspace of ``qr_in_place`` on a
    ``(D, width)`` block: three pieces (a piece's ``Q``, LAPACK's copy of it, and its product with
    the stacked ``Q``) of at most ``QR_PIECE_ELEMENTS`` entries (also what the row-pieced column
    reductions use).

    Parameters
    ----------
    operand
        The operator in the vector layer.
    width
        Columns ``b`` of the block.

    Returns
    -------
    float
        Length-``D`` columns of workspace.
    """
    from curvops.algorithms.vectors import QR_PIECE_ELEMENTS

    return 3 * min(width, QR_PIECE_ELEMENTS / operand.local_dim)


def available_bytes(operand: Any) -> int | None:
    """Memory available now on the operand's device (None where it cannot be read).

    CPU: ``psutil.virtual_memory().available`` if psutil is installed, else ``MemAvailable`` of
    ``/proc/meminfo`` (Linux); CUDA: free memory from ``torch.cuda.mem_get_info``.

    Parameters
    ----------
    operand
        The operator in the vector layer.

    Returns
    -------
    int or None
        Bytes available, or None.
    """
    device = getattr(operand, "device", None)
    if device is not None and device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    if device is not None and device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_budget(operand: Any, memory_budget: Any) -> float:
    """The budget in bytes: ``memory_budget`` if given, else ``DEFAULT_FRACTION`` of
    ``available_bytes`` (``inf`` where that is unknown).

    Parameters
    ----------
    operand
        The operator in the vector layer.
    memory_budget
        Bytes, or None for the default.

    Returns
    -------
    float
        The budget in bytes (``inf`` where unknown).

    Raises
    ------
    ValueError
        If ``memory_budget`` is not a positive number.
    """
    if memory_budget is not None:
        is_number = isinstance(memory_budget, numbers.Real) and not isinstance(memory_budget, bool)
        if not is_number or not float(memory_budget) > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        return float(memory_budget)
    available = available_bytes(operand)
    return math.inf if available is None else DEFAULT_FRACTION * available


def column_bytes(operand: Any) -> int:
    """Bytes of one length-``D`` column (this process's rows) in the working dtype.

    Parameters
    ----------
    operand
        The operator in the vector layer.

    Returns
    -------
    int
        Bytes per column.
    """
    return operand.local_dim * operand.itemsize


def format_bytes(count: float) -> str:
    """``1.5 GiB`` style (binary units).

    Parameters
    ----------
    count
        Bytes.

    Returns
    -------
    str
        The size with a binary unit.
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


def plan_columns(
    operand: Any,
    budget: float,
    fixed_columns: float,
    per_unit_columns: float,
    wanted: int,
    what: str,
    fix: str,
) -> int:
    """Largest ``u <= wanted`` with ``(fixed_columns + u * per_unit_columns)`` columns within
    ``budget``; ``MemoryError`` naming the bytes needed for ``u = 1`` and the ``fix`` if none.

    Parameters
    ----------
    operand
        The operator in the vector layer.
    budget
        Bytes available.
    fixed_columns
        Columns needed whatever ``u``.
    per_unit_columns
        Columns per unit.
    wanted
        Largest ``u`` wanted.
    what
        The call, for the message.
    fix
        What to change, for the message.

    Returns
    -------
    int
        ``u``.

    Raises
    ------
    MemoryError
        If not even one unit fits.
    """
    size = column_bytes(operand)
    spare = budget / size - fixed_columns
    units = wanted if math.isinf(spare) else min(wanted, int(spare // per_unit_columns))
    if units >= 1:
        return units
    needed = (fixed_columns + per_unit_columns) * size
    raise MemoryError(
        f"{what} needs at least {format_bytes(needed)} of working memory "
        f"({fixed_columns + per_unit_columns:.4g} columns of D = {operand.dim:,} x {operand.itemsize} "
        f"bytes), more than its memory budget of {format_bytes(budget)}: {fix}"
    )


def plan_block(
    operand: Any,
    requested: int | None,
    default: int,
    memory_budget: Any,
    fixed_columns: float,
    per_unit_columns: float,
    what: str,
    option: str,
    fix: str,
) -> int:
    """Units per block (probes per block product, probes per Lanczos batch): ``requested`` if
    given (``MemoryError`` if it does not fit), else the largest ``<= default`` that fits.

    ``option`` names the argument that sets it (``"block_size"``); ``fix`` says what else to
    change when even one unit does not fit.

    Parameters
    ----------
    operand
        The operator in the vector layer.
    requested
        Units asked for, or None.
    default
        Units when none are asked for.
    memory_budget
        Bytes, or None for the default.
    fixed_columns
        Columns needed whatever the units.
    per_unit_columns
        Columns per unit.
    what
        The call, for the message.
    option
        The argument that sets the units.
    fix
        What else to change, for the message.

    Returns
    -------
    int
        Units per block.

    Raises
    ------
    MemoryError
        If the requested units, or one unit, do not fit.
    """
    budget = resolve_budget(operand, memory_budget)
    wanted = default if requested is None else requested
    if requested is not None:
        fix = f"pass a smaller {option} (default: as many as fit), or {fix}"
    fitted = plan_columns(operand, budget, fixed_columns, per_unit_columns, wanted, what, fix)
    if fitted < wanted:  # only a requested size is refused; a default shrinks to fit
        if requested is None:
            return fitted
        needed = (fixed_columns + per_unit_columns * wanted) * column_bytes(operand)
        raise MemoryError(
            f"{what} with {option}={wanted} needs {format_bytes(needed)}, more than its memory "
            f"budget of {format_bytes(budget)} (at most {fitted} fit): {fix}"
        )
    return fitted
