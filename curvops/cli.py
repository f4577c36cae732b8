"""The ``curvops`` command line (also ``python -m curvops``).

``curvops spectrum`` computes, at the current weights of a model, the top eigenvalues of a
curvature matrix (Lanczos, with residual norms), a randomized trace estimate with its
standard error (XTrace or Hutch++) and the spectral density (stochastic Lanczos
quadrature). Without ``--model``/``--data`` it first trains a small MLP on scikit-learn's
built-in digits data set (no download). It prints a summary table and writes
``spectrum.json`` (every number, the settings, versions and seed) and ``spectrum.png``.

Exit codes: 0 success, 2 bad arguments (a one-line message, no traceback), 1 an error
inside the user's ``--model``/``--data`` code or during the computation (a one-line
message; ``--traceback`` shows the full traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROG = "curvops"
CURVATURES = ("hessian", "ggn", "fisher", "kfac")
TRACE_METHODS = ("xtrace", "hutchpp")
LOSSES = ("cross_entropy", "mse", "bce")
DTYPES = ("float32", "float64")
_CURVATURE_NAMES = {
    "hessian": "loss Hessian",
    "ggn": "generalized Gauss-Newton (GGN)",
    "fisher": "Monte-Carlo Fisher",
    "kfac": "KFAC (GGN)",
}
_CURVATURE_SYMBOLS = {"hessian": "H", "ggn": "G", "fisher": "F", "kfac": "K"}


class UsageError(Exception):
    """A bad command-line argument: reported in one line with exit code 2."""


class UserCodeError(Exception):
    """An exception raised by the user's ``--model``/``--data`` function: exit code 1."""


# ====================================================================== argument parsing
def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _gibibytes(text: str) -> float:
    """argparse type: a positive number of GiB, returned in bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text}")
    return value * 2**30


def _seed(text: str) -> int:
    """argparse type: a seed accepted by numpy and torch (0 <= seed < 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**32), got {value}")
    return value


def _callable_spec(text: str) -> str:
    """argparse type: ``module:function`` or ``path/to/file.py:function`` (checked syntactically)."""
    module, sep, function = text.rpartition(":")
    if not sep or not module or not function.isidentifier():
        raise argparse.ArgumentTypeError(f"expected MODULE:FUNCTION or FILE.py:FUNCTION, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvops`` command.

    Returns
    -------
    argparse.ArgumentParser
        With the ``spectrum`` sub-command and ``--version``.
    """
    from curvops import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Loss curvature (Hessian, GGN, Fisher, KFAC) of neural networks as linear operators.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    spectrum = commands.add_parser(
        "spectrum",
        help="top eigenvalues, trace and spectral density of a curvature matrix",
        description=(
            "Top-k eigenvalues (Lanczos, with residuals), trace estimate with standard error "
            "(XTrace or Hutch++) and SLQ spectral density of a loss curvature matrix at the "
            "model's weights. Without --model/--data: trains a small MLP on scikit-learn's "
            "digits data set first (no download)."
        ),
        epilog=(
            "Your own model: --model pkg.module:make_model --data pkg.module:make_data. "
            "make_model() returns an nn.Module (its current weights are used; no training) or "
            "a tuple (model, loss_fn); make_data() returns a re-iterable of (inputs, targets) "
            "batches (a list or a non-shuffling DataLoader). FILE.py:function works too."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # One usage line: errors print it, and the full option list is in --help.
        usage="%(prog)s [options]  (see: curvops spectrum --help)",
    )
    what = spectrum.add_argument_group("what to compute")
    what.add_argument("--curvature", choices=CURVATURES, default="hessian", help="curvature matrix")
    what.add_argument("-k", type=_positive_int, default=10, help="number of top eigenvalues")
    what.add_argument(
        "--probes", type=_positive_int, default=10, help="random probes of the spectral density (SLQ)"
    )
    what.add_argument(
        "--lanczos-steps",
        type=_positive_int,
        default=80,
        help="Lanczos steps per SLQ probe (resolution of the density)",
    )
    what.add_argument("--trace-method", choices=TRACE_METHODS, default="xtrace", help="trace estimator")
    what.add_argument(
        "--trace-matvecs",
        type=_positive_int,
        default=100,
        help="matrix-vector products spent on the trace estimate",
    )
    what.add_argument(
        "--params",
        action="append",
        metavar="GLOB",
        help="restrict to parameters whose names match (repeatable; default: all)",
    )
    what.add_argument(
        "--seed", type=_seed, default=0, help="seed of the initialization, training and all random probes"
    )

    model = spectrum.add_argument_group("model and data (default: built-in digits MLP)")
    model.add_argument(
        "--model",
        type=_callable_spec,
        metavar="MODULE:FUNCTION",
        help="function returning your model, or (model, loss_fn)",
    )
    model.add_argument(
        "--data",
        type=_callable_spec,
        metavar="MODULE:FUNCTION",
        help="function returning your (inputs, targets) batches",
    )
    model.add_argument(
        "--loss",
        choices=LOSSES,
        default="cross_entropy",
        help="loss with --model (mean reduction), unless it returns (model, loss_fn)",
    )
    model.add_argument(
        "--epochs",
        type=_nonnegative_int,
        default=8,
        help="training epochs of the built-in example (ignored with --model)",
    )

    run = spectrum.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    run.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="floating-point type of weights and data"
    )
    run.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: 1 for the built-in example, whose products are "
        "too small to gain from threads; torch's default otherwise)",
    )
    run.add_argument(
        "--memory-budget",
        type=_gibibytes,
        default=None,
        metavar="GIB",
        help="working memory of the trace and density algorithms, in GiB (default: half "
        "the memory available on the device when each starts); their probe blocks "
        "are chosen to fit, or the run stops before its products with the bytes needed",
    )
    run.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="directory for spectrum.json and spectrum.png (created if missing)",
    )
    run.add_argument(
        "--density-scale", choices=("log", "linear"), default="log", help="density axis of the plot"
    )
    run.add_argument("--no-plot", action="store_true", help="do not write spectrum.png")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    run.add_argument("--traceback", action="store_true", help="show full tracebacks of errors")
    return parser


# ====================================================================== main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvops`` console script and of ``python -m curvops``.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit code: 0 success, 2 a bad argument (one line on stderr), 1 an error in the
        user's ``--model``/``--data`` code or in the computation (one line; ``--traceback``
        re-raises it), 130 interrupted. argparse's own syntax errors exit with code 2
        through ``SystemExit``.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)  # exits with code 2 and a usage line on bad syntax
    args.argv = argv  # recorded in spectrum.json, so a run can be repeated
    show_traceback = bool(getattr(args, "traceback", False))
    try:
        if args.command == "spectrum":
            run_spectrum(args)
        return 0
    except UsageError as error:
        if show_traceback:
            raise
        _subparser(parser, args.command).print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except UserCodeError as error:
        if show_traceback:
            raise
        print(f"{PROG} {args.command}: error: {error} (rerun with --traceback for details)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure in the computation: one line unless asked
        if show_traceback:
            raise
        print(
            f"{PROG} {args.command}: error: {type(error).__name__}: {error} "
            "(rerun with --traceback for details)",
            file=sys.stderr,
        )
        return 1


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The sub-command parser ``name`` (for its usage line)."""
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


# ====================================================================== spectrum
def run_spectrum(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``curvops spectrum``: estimate, print the summary, write ``spectrum.json`` (and ``.png``).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments of the ``spectrum`` sub-command (:func:`build_parser`).

    Returns
    -------
    dict
        The record written to ``spectrum.json`` (before JSON conversion: arrays and
        non-finite floats are converted on writing).

    Raises
    ------
    UsageError
        An argument that cannot work (``--model`` without ``--data``, an unusable device,
        ``-k`` not below the dimension, ...).
    UserCodeError
        The user's ``--model``/``--data`` function or module raised.
    """
    import torch

    started = time.perf_counter()
    if (args.model is None) != (args.data is None):
        raise UsageError("--model and --data must be given together")
    device = _check_device(args.device)
    dtype = getattr(torch, args.dtype)
    builtin = args.model is None
    threads = args.threads if args.threads is not None else (1 if builtin else None)
    if threads is not None:
        torch.set_num_threads(threads)
    progress = not args.quiet
    output = args.output
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} exists and is not a directory")
    plot = not args.no_plot and _have_matplotlib()
    if not args.no_plot and not plot:
        print(
            "note: matplotlib is not installed, so no spectrum.png (pip install 'curvops[plot]')",
            file=sys.stderr,
        )

    timings: dict[str, float] = {}
    if builtin:
        problem = _builtin_problem(args, device, dtype, progress, timings)
    else:
        problem = _user_problem(args, device, dtype)
    operator = _make_operator(args, problem, device)
    dim = operator.shape[0]
    _check_sizes(args, dim)

    results = _estimate(args, operator, progress, timings)
    record = _record(args, problem, operator, results, timings, device, dtype, threads)

    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "spectrum.json"
    png_path = output / "spectrum.png"
    written = [json_path]
    if plot:
        _plot(record, results, png_path, log_scale=args.density_scale == "log")
        written.append(png_path)
    record["timings_s"]["total"] = time.perf_counter() - started
    json_path.write_text(json.dumps(_jsonable(record), indent=2) + "\n", encoding="utf-8")
    print(_summary(record, written))
    return record


def _check_device(text: str) -> Any:
    """Parse ``--device`` and check that it is usable."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {text}: unsupported device type {device.type!r}")
    return device


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _check_sizes(args: argparse.Namespace, dim: int) -> None:
    """Reject settings the algorithms cannot run with this operator dimension."""
    if args.k >= dim:
        raise UsageError(f"-k {args.k} must be smaller than the number of parameters D = {dim}")
    if args.trace_method == "xtrace" and args.trace_matvecs < 2:
        raise UsageError("--trace-matvecs must be at least 2 for xtrace (two products per probe)")


# ---------------------------------------------------------------------- problems
class _Problem:
    """Model, loss and data of a run, with a description for the report."""

    def __init__(self, model: Any, loss_fn: Any, data: Any, description: dict[str, Any]) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.description = description


def _builtin_problem(
    args: argparse.Namespace, device: Any, dtype: Any, progress: bool, timings: dict[str, float]
) -> _Problem:
    """Train the digits MLP (``--epochs``) and return it with its training data."""
    from torch import nn

    from curvops import _demo

    try:
        data = _demo.load_digits_split(seed=args.seed, dtype=dtype, device=device)
    except ImportError as error:
        raise UsageError(f"{error} (or pass --model/--data)") from None
    model = _demo.digits_mlp(seed=args.seed, dtype=dtype, device=device)
    start = time.perf_counter()
    history = _demo.train_classifier(
        model, data.x_train, data.y_train, epochs=args.epochs, seed=args.seed, progress=progress
    )
    timings["training"] = time.perf_counter() - start
    train_loss, train_accuracy = _demo.evaluate_classifier(model, data.x_train, data.y_train)
    test_loss, test_accuracy = _demo.evaluate_classifier(model, data.x_test, data.y_test)
    import sklearn

    description = {
        "source": "built-in",
        "model": "MLP "
        + "-".join(str(n) for n in (_demo.NUM_FEATURES, *_demo.HIDDEN, _demo.NUM_CLASSES))
        + " (tanh)",
        "data": "sklearn.datasets.load_digits (8x8 handwritten digits, 10 classes)",
        "num_train": int(data.x_train.shape[0]),
        "num_test": int(data.x_test.shape[0]),
        "loss": "cross_entropy (mean)",
        "training": {
            "optimizer": "Adam",
            "lr": 1e-2,
            "batch_size": 64,
            "epochs": args.epochs,
            "epoch_losses": history,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        },
        "scikit_learn_version": sklearn.__version__,
    }
    # The curvature of the training objective: all training samples in one batch (the
    # operators average over batches exactly, so one batch is only the fastest layout here).
    return _Problem(model, nn.CrossEntropyLoss(), [(data.x_train, data.y_train)], description)


def _user_problem(args: argparse.Namespace, device: Any, dtype: Any) -> _Problem:
    """Load the user's model and data from their ``module:function`` specifications."""
    from torch import nn

    make_model = _load_callable(args.model, "--model")
    make_data = _load_callable(args.data, "--data")
    built = _call_user(make_model, args.model)
    loss_fn: Any
    if isinstance(built, tuple) and len(built) == 2:
        model, loss_fn = built
    else:
        model, loss_fn = built, None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {args.model} returned {type(model).__name__}, expected an nn.Module "
            "or a tuple (model, loss_fn)"
        )
    if loss_fn is None:
        loss_fn = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[
            args.loss
        ]()
    elif not callable(loss_fn):
        raise UsageError(
            f"--model {args.model} returned a loss that is not callable: {type(loss_fn).__name__}"
        )
    data = _call_user(make_data, args.data)
    if iter(data) is data:
        # The operators pass over the data many times: a generator would be exhausted.
        raise UsageError(
            f"--data {args.data} returned a one-shot iterator; return a list of "
            "batches or a non-shuffling DataLoader"
        )
    # Weights and floating-point data in the requested dtype and device; dropout and batch-norm
    # statistics frozen (eval mode), since the curvature must be that of one fixed function.
    model = model.to(device=device, dtype=dtype).eval()
    description = {
        "source": "user",
        "model": f"{args.model} ({type(model).__name__})",
        "data": args.data,
        "loss": type(loss_fn).__name__,
    }
    return _Problem(model, loss_fn, _CastBatches(data, device, dtype), description)


def _load_callable(spec: str, option: str) -> Callable[[], Any]:
    """Resolve ``module:function`` or ``file.py:function`` to the function."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"{option} {spec}: no file {target!r}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None:
                raise UsageError(f"{option} {spec}: cannot load {target!r} as a module")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            # Console scripts do not put the working directory on sys.path; `python -m` does.
            # Users expect `--model mymodule:f` to find ./mymodule.py in both cases; for this
            # import only: left in front, it would shadow installed modules imported later
            # (a stray matplotlib.py in the working directory).
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(target)
            finally:
                if added and cwd in sys.path:
                    sys.path.remove(cwd)
    except UsageError:
        raise
    except ModuleNotFoundError as error:
        raise UsageError(f"{option} {spec}: cannot import {error.name!r}") from None
    except Exception as error:  # the module itself failed while importing
        raise UserCodeError(
            f"{option} {spec}: importing {target!r} raised {type(error).__name__}: {error}"
        ) from error
    function = getattr(module, name, None)
    if function is None:
        raise UsageError(f"{option} {spec}: {target!r} has no attribute {name!r}")
    if not callable(function):
        raise UsageError(f"{option} {spec}: {name!r} is not callable")
    return function


def _call_user(function: Callable[[], Any], spec: str) -> Any:
    try:
        return function()
    except Exception as error:
        raise UserCodeError(f"{spec}() raised {type(error).__name__}: {error}") from error


class _CastBatches:
    """Re-iterable view of ``(inputs, targets)`` batches with floating tensors cast to a dtype.

    Converts lazily, batch by batch, so a large DataLoader is not held in memory twice.
    Integer tensors (class labels, token ids) keep their dtype.
    """

    def __init__(self, batches: Iterable[Any], device: Any, dtype: Any) -> None:
        self.batches = batches
        self.device = device
        self.dtype = dtype

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield self._convert(batch)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def _convert(self, item: Any) -> Any:
        import torch

        if torch.is_tensor(item):
            if item.is_floating_point():
                return item.to(device=self.device, dtype=self.dtype)
            return item.to(device=self.device)
        if isinstance(item, dict):
            return {key: self._convert(value) for key, value in item.items()}
        if isinstance(item, (tuple, list)):
            return type(item)(self._convert(value) for value in item)
        return item


def _make_operator(args: argparse.Namespace, problem: _Problem, device: Any) -> Any:
    """The curvature operator chosen by ``--curvature``."""
    from curvops import FisherOperator, GGNOperator, HessianOperator
    from curvops.operators.kfac import KFACOperator

    params = args.params
    try:
        if args.curvature == "hessian":
            return HessianOperator(problem.model, problem.loss_fn, problem.data, params=params)
        if args.curvature == "ggn":
            return GGNOperator(problem.model, problem.loss_fn, problem.data, params=params)
        if args.curvature == "fisher":
            return FisherOperator(
                problem.model, problem.loss_fn, problem.data, params=params, kind="mc", seed=args.seed
            )
        return KFACOperator(problem.model, problem.loss_fn, problem.data, params=params, seed=args.seed)
    except ValueError as error:
        # Parameter patterns that match nothing, unsupported layers for KFAC, a loss the
        # curvature does not support: all consequences of the arguments given.
        raise UsageError(f"cannot build the {args.curvature} operator: {error}") from None


# ---------------------------------------------------------------------- estimation
class _Counted:
    """Torch-native view of an operator that advances a progress bar per product column.

    The algorithms accept any object with ``shape``, ``device``, ``torch_dtype`` and
    ``matmat_torch``; wrapping keeps them unaware of progress display.
    """

    def __init__(self, operator: Any, bar: Any) -> None:
        self.operator = operator
        self.bar = bar
        self.shape = operator.shape
        self.device = operator.device
        self.torch_dtype = operator.torch_dtype

    def matmat_torch(self, block: Any) -> Any:
        result = self.operator.matmat_torch(block)
        self.bar.update(int(block.shape[1]))
        return result


def _estimate(
    args: argparse.Namespace, operator: Any, progress: bool, timings: dict[str, float]
) -> dict[str, Any]:
    """Run Lanczos, the trace estimator and SLQ; time each."""
    from curvops import hutchpp_trace, lanczos, spectral_density, xtrace
    from curvops._demo import _bar

    results: dict[str, Any] = {}
    dim = operator.shape[0]

    bar = _bar(total=None, desc=f"top-{args.k} eigenvalues (Lanczos)", unit="matvec", enabled=progress)
    start = time.perf_counter()
    try:
        results["eigen"] = lanczos(_Counted(operator, bar), k=args.k, which="LA", seed=args.seed)
    finally:
        bar.close()
    timings["eigenvalues"] = time.perf_counter() - start

    budget = min(args.trace_matvecs, dim)
    bar = _bar(total=budget, desc=f"trace ({args.trace_method})", unit="matvec", enabled=progress)
    start = time.perf_counter()
    try:
        method = xtrace if args.trace_method == "xtrace" else hutchpp_trace
        results["trace"] = method(
            _Counted(operator, bar), args.trace_matvecs, seed=args.seed, memory_budget=args.memory_budget
        )
    finally:
        bar.close()
    timings["trace"] = time.perf_counter() - start

    steps = min(args.lanczos_steps, dim)
    bar = _bar(total=args.probes * steps, desc="spectral density (SLQ)", unit="matvec", enabled=progress)
    start = time.perf_counter()
    try:
        results["density"] = spectral_density(
            _Counted(operator, bar),
            num_probes=args.probes,
            lanczos_steps=args.lanczos_steps,
            seed=args.seed,
            memory_budget=args.memory_budget,
        )
    finally:
        bar.close()
    timings["density"] = time.perf_counter() - start
    return results


# ---------------------------------------------------------------------- report
def _record(
    args: argparse.Namespace,
    problem: _Problem,
    operator: Any,
    results: dict[str, Any],
    timings: dict[str, float],
    device: Any,
    dtype: Any,
    threads: int | None,
) -> dict[str, Any]:
    """Everything the run produced, as a JSON-ready dict."""
    import scipy
    import torch

    import curvops

    eigen = results["eigen"]
    trace = results["trace"]
    density = results["density"]
    dim = operator.shape[0]
    loss, gradient = operator.loss_and_gradient()
    mean_eigenvalue, mean_eigenvalue_error = density.moment(1)
    curve = density.evaluate(num_points=512)
    exact_trace = float(operator.trace()) if hasattr(operator, "trace") and callable(operator.trace) else None
    record: dict[str, Any] = {
        "format": "curvops.spectrum/1",
        "curvature": args.curvature,
        "curvature_name": _CURVATURE_NAMES[args.curvature],
        "problem": problem.description,
        "num_parameters": dim,
        "parameters": list(operator.param_names),
        "loss_at_weights": float(loss),
        "gradient_norm": float(torch.linalg.vector_norm(gradient)),
        "eigenvalues": {
            "which": "largest algebraic (LA)",
            "values": _floats(eigen.eigenvalues),
            "residual_norms": _floats(eigen.residual_norms),
            "relative_residuals": [
                r / max(abs(v), np.finfo(float).tiny)
                for v, r in zip(_floats(eigen.eigenvalues), _floats(eigen.residual_norms))
            ],
            "converged": [bool(c) for c in _to_numpy(eigen.converged)],
            "num_matvecs": int(eigen.num_matvecs),
            "num_restarts": int(eigen.num_restarts),
        },
        "trace": {
            "method": args.trace_method,
            "estimate": trace.estimate,
            "standard_error": trace.standard_error,
            "num_matvecs": trace.num_matvecs,
            "exact": trace.exact,
            "closed_form": exact_trace,
            "slq_estimate": mean_eigenvalue * dim,
            "slq_standard_error": mean_eigenvalue_error * dim,
        },
        "density": {
            "method": "stochastic Lanczos quadrature",
            "num_probes": density.num_probes,
            "lanczos_steps": int(density.nodes.shape[1]),
            "num_matvecs": density.num_matvecs,
            "spectral_range": list(density.spectral_range),
            "sigma": curve.sigma,
            "curve": {
                "grid": curve.grid,
                "density": curve.density,
                "lower": curve.lower,
                "upper": curve.upper,
                "standard_error": curve.standard_error,
            },
            "slq": density.to_dict(),
        },
        "settings": {
            "curvature": args.curvature,
            "k": args.k,
            "probes": args.probes,
            "lanczos_steps": args.lanczos_steps,
            "trace_method": args.trace_method,
            "trace_matvecs": args.trace_matvecs,
            "params": args.params,
            "seed": args.seed,
            "memory_budget_bytes": args.memory_budget,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if threads is None else threads,
            "epochs": args.epochs if args.model is None else None,
            "model": args.model,
            "data": args.data,
            "loss": args.loss if args.model is not None else "cross_entropy",
        },
        "seed": args.seed,
        "versions": {
            "curvops": curvops.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": [PROG, *getattr(args, "argv", [])],
        "timings_s": dict(timings),
    }
    return record


def _to_numpy(array: Any) -> np.ndarray:
    import torch

    if torch.is_tensor(array):
        return array.detach().cpu().double().numpy() if array.is_floating_point() else array.cpu().numpy()
    return np.asarray(array)


def _floats(array: Any) -> list[float]:
    return [float(x) for x in _to_numpy(array).reshape(-1)]


def _jsonable(value: Any) -> Any:
    """Convert arrays and non-finite floats (JSON has no NaN: they become null)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _format_uncertain(value: float, error: float) -> str:
    """``value ± error`` with the value rounded to the error's second significant digit."""
    if not math.isfinite(error) or error <= 0:
        return f"{value:.6g}" + ("" if math.isfinite(error) else " (no error estimate)")
    digits = max(0, 1 - int(math.floor(math.log10(error))))
    return f"{value:.{digits}f} ± {error:.{digits}f}"


def _summary(record: dict[str, Any], written: list[Path]) -> str:
    """The human-readable summary printed at the end of a run."""
    problem = record["problem"]
    symbol = _CURVATURE_SYMBOLS[record["curvature"]]
    lines = [
        f"curvops spectrum: {record['curvature_name']} of {problem['model']}, "
        f"D = {record['num_parameters']:,} parameters",
        f"  data: {problem['data']}",
    ]
    if problem["source"] == "built-in":
        training = problem["training"]
        lines.append(
            f"  trained {training['epochs']} epochs on {problem['num_train']:,} samples: "
            f"train loss {training['train_loss']:.4f}, "
            f"train accuracy {100 * training['train_accuracy']:.1f}%, "
            f"test accuracy {100 * training['test_accuracy']:.1f}% ({problem['num_test']:,} samples)"
        )
    lines.append(
        f"  loss at these weights {record['loss_at_weights']:.6g}, "
        f"gradient norm {record['gradient_norm']:.3g}"
    )
    eigen = record["eigenvalues"]
    lines += [
        "",
        f"Top {len(eigen['values'])} eigenvalues (Lanczos, {eigen['num_matvecs']} matvecs)",
        f"  {'#':>3}  {'eigenvalue':>12}  {'residual':>10}  {'rel. residual':>13}  converged",
        f"  {'-' * 3}  {'-' * 12}  {'-' * 10}  {'-' * 13}  ---------",
    ]
    for index, (value, residual, relative, converged) in enumerate(
        zip(eigen["values"], eigen["residual_norms"], eigen["relative_residuals"], eigen["converged"]), 1
    ):
        lines.append(
            f"  {index:>3}  {value:>12.6g}  {residual:>10.2e}  {relative:>13.2e}  "
            f"{'yes' if converged else 'NO'}"
        )
    lines.append(f"  residual = ||{symbol}v - λv||; the eigenvalue error is at most the residual")
    trace = record["trace"]
    name = {"xtrace": "XTrace", "hutchpp": "Hutch++"}[trace["method"]]
    lines += ["", "Trace"]
    if trace["exact"]:
        lines.append(f"  tr({symbol}) = {trace['estimate']:.6g} (exact: budget >= D)")
    else:
        lines.append(
            f"  tr({symbol}) = {_format_uncertain(trace['estimate'], trace['standard_error'])} "
            f"(1 s.e.; {name}, {trace['num_matvecs']} matvecs)"
        )
    lines.append(
        f"  tr({symbol}) = {_format_uncertain(trace['slq_estimate'], trace['slq_standard_error'])} "
        "(1 s.e.; first SLQ moment, cross-check)"
    )
    if trace["closed_form"] is not None:
        lines.append(f"  tr({symbol}) = {trace['closed_form']:.6g} (closed form of the Kronecker factors)")
    density = record["density"]
    low, high = density["spectral_range"]
    lines += [
        "",
        "Spectral density (SLQ)",
        f"  {density['num_probes']} probes x {density['lanczos_steps']} Lanczos steps "
        f"({density['num_matvecs']} matvecs), Ritz values in [{low:.4g}, {high:.4g}], "
        f"broadening sigma = {density['sigma']:.3g}",
    ]
    timings = record["timings_s"]
    parts = [f"{key} {value:.1f} s" for key, value in timings.items() if key != "total"]
    lines += [
        "",
        "time: " + ", ".join(parts) + f"; total {timings.get('total', float('nan')):.1f} s",
        "wrote " + ", ".join(str(path) for path in written),
    ]
    return "\n".join(lines)


def _plot(record: dict[str, Any], results: dict[str, Any], path: Path, *, log_scale: bool) -> None:
    """Density with its ±2 s.e. band, the top eigenvalues marked, the trace in a corner."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    density = results["density"]
    curve = density.evaluate(num_points=1024)
    eigenvalues = record["eigenvalues"]["values"]
    symbol = _CURVATURE_SYMBOLS[record["curvature"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=150, layout="constrained")
    ax.plot(
        curve.grid,
        curve.density,
        color="C0",
        linewidth=1.5,
        label=f"SLQ ({density.num_probes} probes × {density.nodes.shape[1]} steps)",
    )
    if density.num_probes > 1:
        ax.fill_between(
            curve.grid,
            curve.lower,
            curve.upper,
            color="C0",
            alpha=0.25,
            linewidth=0,
            label="± 2 s.e. across probes",
        )
    if log_scale:
        ax.set_yscale("log")
        top = float(curve.upper.max())
        # Eight decades show the bulk and the outliers without the Gaussian tails' noise floor.
        ax.set_ylim(top * 1e-8, top * 3)
    else:
        ax.set_ylim(0, float(curve.upper.max()) * 1.05)
    for index, value in enumerate(eigenvalues):
        ax.axvline(
            value,
            color="C3",
            linewidth=0.8,
            alpha=0.7,
            linestyle="--",
            label=f"top-{len(eigenvalues)} eigenvalues" if index == 0 else None,
        )
    ax.plot(
        eigenvalues,
        np.full(len(eigenvalues), 1.0),
        transform=ax.get_xaxis_transform(),
        linestyle="none",
        marker="v",
        color="C3",
        markersize=5,
        clip_on=False,
    )
    ax.set_xlabel(f"eigenvalue λ of {symbol}")
    ax.set_ylabel("spectral density" + (" (log scale)" if log_scale else ""))
    problem = record["problem"]
    # pad: room for the eigenvalue markers drawn on the top edge
    ax.set_title(
        f"{record['curvature_name']}: {problem['model']}, D = {record['num_parameters']:,}",
        fontsize=10,
        pad=12,
    )
    trace = record["trace"]
    if trace["exact"]:
        text = f"tr({symbol}) = {trace['estimate']:.4g} (exact)"
    else:
        name = {"xtrace": "XTrace", "hutchpp": "Hutch++"}[trace["method"]]
        text = (
            f"tr({symbol}) = {_format_uncertain(trace['estimate'], 2 * trace['standard_error'])}\n"
            f"({name}, ± 2 s.e., {trace['num_matvecs']} matvecs)"
        )
    text += f"\nλ_max = {eigenvalues[0]:.4g}"
    ax.text(
        0.98,
        0.96,
        text,
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.9},
    )
    # Below the axes: inside, it would cover the outliers the plot is about.
    fig.legend(loc="outside lower center", ncols=3, fontsize=7.5, frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover - `python -m curvops.cli`
    sys.exit(main())
