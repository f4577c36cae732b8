"""The ``curvops`` command line (also ``python -m curvops``).

``curvops spectrum`` computes, at the current weights of a model, the top eigenvalues of a
curvature matrix (Lanczos, with residual norms), a randomized trace estimate with its
standard error (XTrace or Hutch++) and the spectral density (stochastic Lanczos
quadrature). Without ``--model``/``--data`` it first trains a small MLP on scikit-learn's
built-in digits data set (no download). It prints a summary table and writes
``spectrum.json`` (every number, the settings, versions and seed) and ``spectrum.png``.

Exit codes: 0 success, 2 bad arguments (a one-line message, no traceback), 1 an error
inside the user's ``--model``/``--data`` code or during the computation (a one-line
message; ``--traceback`` shows the full traceback), 130 interrupted (Ctrl-C: the steps
already finished are written to ``spectrum.json``, marked incomplete, and ``--resume``
continues from them).
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
#: The estimation steps of ``curvops spectrum``, in the order they run; the keys of its
#: results and of ``timings_s``, and the names ``spectrum.json`` lists under ``missing``.
STEPS = ("eigenvalues", "trace", "density")
#: Settings that determine the numbers of a run: ``--resume`` refuses a file whose values
#: differ. Threads and the memory budget only change how the products are batched.
_RESUME_SETTINGS = (
    "curvature",
    "k",
    "probes",
    "lanczos_steps",
    "trace_method",
    "trace_matvecs",
    "params",
    "seed",
    "device",
    "dtype",
    "epochs",
    "model",
    "data",
    "loss",
)
#: Eigenvalues labelled by their rank in the figure; the others are drawn fainter.
_LABELLED_EIGENVALUES = 3


class UsageError(Exception):
    """A bad command-line argument: reported in one line with exit code 2."""


class UserCodeError(Exception):
    """An exception raised by the user's ``--model``/``--data`` function: exit code 1."""


class Interrupted(Exception):
    """Ctrl-C during a run, after writing what was finished: exit code 130, one line."""


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after an option's help, unless the help states the default itself.

    Options without a value (``None``: "not given", a flag's ``False``) show no default:
    their help says what happens when they are left out.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


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
        formatter_class=_HelpFormatter,
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
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose spectrum.json is in --output (written by an interrupted run "
        "with the same options): its finished steps are read, not recomputed",
    )
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
        re-raises it), 130 interrupted (one line; what was finished is written, see
        ``--resume``). argparse's own syntax errors exit with code 2 through ``SystemExit``.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a sub-command started (or a second Ctrl-C): nothing to save
        return _exit_interrupted()


def _exit_interrupted(message: str = "interrupted", command: str | None = None) -> int:
    """Report an interrupt in one line on stderr and return the exit code 130.

    Parameters
    ----------
    message : str, optional
        What was done about the interrupt (default ``"interrupted"``).
    command : str, optional
        The sub-command that was running, named in the line as in error messages.

    Returns
    -------
    int
        130, the shell's code for a process ended by Ctrl-C (128 + SIGINT).
    """
    print(f"{PROG} {command}: {message}" if command else f"{PROG}: {message}", file=sys.stderr)
    return 130


def _main(argv: Sequence[str] | None) -> int:
    """``main`` without its last-resort interrupt handler."""
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
    except Interrupted as interrupt:
        return _exit_interrupted(str(interrupt), args.command)
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
        The parsed arguments of the ``spectrum`` sub-command (``build_parser``).

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
    Interrupted
        Ctrl-C; the steps finished by then are in ``spectrum.json``, marked incomplete.
    """
    try:
        return _run_spectrum(args)
    except KeyboardInterrupt:  # before any step finished (while importing, training, ...)
        raise Interrupted("interrupted before any step finished; nothing written") from None


def _run_spectrum(args: argparse.Namespace) -> dict[str, Any]:
    """``run_spectrum``, which interrupts stop with nothing written."""
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
    json_path = output / "spectrum.json"
    settings = _settings(args, device, dtype, threads)
    results: dict[str, Any] = {}
    resumed_timings: dict[str, float] = {}
    if args.resume:  # checked before the training, which a mismatch would waste
        results, resumed_timings = _read_resumable(json_path, settings)
    plot = not args.no_plot and _have_matplotlib()
    if not args.no_plot and not plot:
        print(
            "note: matplotlib is not installed, so no spectrum.png "
            '(pip install matplotlib; from a clone: pip install -e ".[plot]")',
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
    if args.resume:
        _check_resumed_problem(json_path, operator)
        timings.update(resumed_timings)

    try:
        _estimate(args, operator, progress, timings, results)
        record = _record(args, problem, operator, results, timings, settings)
        output.mkdir(parents=True, exist_ok=True)
        png_path = output / "spectrum.png"
        written = [json_path]
        if plot:
            _plot(record, results, png_path, log_scale=args.density_scale == "log")
            written.append(png_path)
        record["timings_s"]["total"] = time.perf_counter() - started
        _write_json(json_path, record)
    except KeyboardInterrupt:
        raise Interrupted(_save_partial(args, problem, operator, results, timings, settings)) from None
    print(_summary(record, written, resumed=list(resumed_timings)))
    return record


def _save_partial(
    args: argparse.Namespace,
    problem: _Problem,
    operator: Any,
    results: dict[str, Any],
    timings: dict[str, float],
    settings: dict[str, Any],
) -> str:
    """Write the finished steps to ``spectrum.json`` after an interrupt; say so in one line."""
    if not results:
        return "interrupted before any step finished; nothing written"
    record = _partial_record(args, problem, operator, results, timings, settings)
    json_path = args.output / "spectrum.json"
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        _write_json(json_path, record)
    except KeyboardInterrupt:
        return f"interrupted again while writing; {json_path} left as it was"
    done = ", ".join(step for step in STEPS if step in results)
    missing = ", ".join(record["missing"]) or "the report"
    return (
        f"interrupted; wrote {json_path} with the finished steps ({done}; missing: {missing}): "
        "the same command with --resume continues from them"
    )


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON, replacing ``path`` only once the new text is complete.

    An interrupt while writing then leaves the previous file, which ``--resume`` may need.
    """
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(_jsonable(record), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


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
    args: argparse.Namespace,
    operator: Any,
    progress: bool,
    timings: dict[str, float],
    results: dict[str, Any],
) -> None:
    """Run Lanczos, the trace estimator and SLQ, each unless ``results`` has it; time each.

    Each result enters ``results`` as soon as its step ends, so an interrupt in a later step
    leaves the finished ones there to be written.
    """
    import curvops
    from curvops._demo import _bar

    dim = operator.shape[0]
    # Every step draws its probes from --seed alone, so a step run after a resume gives the
    # numbers it would have given in one uninterrupted run.
    if "eigenvalues" not in results:
        bar = _bar(total=None, desc=f"top-{args.k} eigenvalues (Lanczos)", unit="matvec", enabled=progress)
        start = time.perf_counter()
        try:
            results["eigenvalues"] = curvops.lanczos(
                _Counted(operator, bar), k=args.k, which="LA", seed=args.seed
            )
        finally:
            bar.close()
        timings["eigenvalues"] = time.perf_counter() - start

    if "trace" not in results:
        budget = min(args.trace_matvecs, dim)
        bar = _bar(total=budget, desc=f"trace ({args.trace_method})", unit="matvec", enabled=progress)
        start = time.perf_counter()
        try:
            method = curvops.xtrace if args.trace_method == "xtrace" else curvops.hutchpp_trace
            results["trace"] = method(
                _Counted(operator, bar), args.trace_matvecs, seed=args.seed, memory_budget=args.memory_budget
            )
        finally:
            bar.close()
        timings["trace"] = time.perf_counter() - start

    if "density" not in results:
        steps = min(args.lanczos_steps, dim)
        bar = _bar(total=args.probes * steps, desc="spectral density (SLQ)", unit="matvec", enabled=progress)
        start = time.perf_counter()
        try:
            results["density"] = curvops.spectral_density(
                _Counted(operator, bar),
                num_probes=args.probes,
                lanczos_steps=args.lanczos_steps,
                seed=args.seed,
                memory_budget=args.memory_budget,
            )
        finally:
            bar.close()
        timings["density"] = time.perf_counter() - start


# ---------------------------------------------------------------------- report
def _settings(args: argparse.Namespace, device: Any, dtype: Any, threads: int | None) -> dict[str, Any]:
    """The options of a run, as ``spectrum.json`` records them under ``settings``."""
    import torch

    return {
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
    }


def _eigen_section(eigen: Any) -> dict[str, Any]:
    """``spectrum.json``'s ``eigenvalues``: everything but the eigenvectors."""
    values, residuals = _floats(eigen.eigenvalues), _floats(eigen.residual_norms)
    return {
        "which": "largest algebraic (LA)",
        "values": values,
        "residual_norms": residuals,
        "relative_residuals": [r / max(abs(v), np.finfo(float).tiny) for v, r in zip(values, residuals)],
        "converged": [bool(c) for c in _to_numpy(eigen.converged)],
        "num_matvecs": int(eigen.num_matvecs),
        "num_restarts": int(eigen.num_restarts),
    }


def _trace_section(args: argparse.Namespace, trace: Any) -> dict[str, Any]:
    """``spectrum.json``'s ``trace`` as the trace step leaves it (no SLQ cross-check yet)."""
    return {
        "method": args.trace_method,
        "estimate": trace.estimate,
        "standard_error": trace.standard_error,
        "num_matvecs": trace.num_matvecs,
        "exact": trace.exact,
    }


def _density_section(density: Any) -> dict[str, Any]:
    """``spectrum.json``'s ``density``: the plotted curve and the raw SLQ nodes and weights."""
    curve = density.evaluate(num_points=512)
    return {
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
    }


def _header(
    args: argparse.Namespace, problem: _Problem, operator: Any, complete: bool, missing: list[str]
) -> dict[str, Any]:
    """The first keys of ``spectrum.json``: what was computed, for what, and whether all of it."""
    return {
        "format": "curvops.spectrum/1",
        # False in a file written after an interrupt: `missing` names the steps to --resume.
        "complete": complete,
        "missing": missing,
        "curvature": args.curvature,
        "curvature_name": _CURVATURE_NAMES[args.curvature],
        "problem": problem.description,
        "num_parameters": operator.shape[0],
        "parameters": list(operator.param_names),
    }


def _footer(args: argparse.Namespace, settings: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The last keys of ``spectrum.json``: how the numbers were made."""
    import scipy
    import torch

    import curvops

    return {
        "settings": dict(settings),
        "seed": args.seed,
        "versions": {
            "curvops": curvops.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        # The command that computes every number from scratch: --resume only reuses them.
        "command": [PROG, *(arg for arg in getattr(args, "argv", []) if arg != "--resume")],
        "timings_s": dict(timings),
    }


def _partial_record(
    args: argparse.Namespace,
    problem: _Problem,
    operator: Any,
    results: dict[str, Any],
    timings: dict[str, float],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The finished steps of an interrupted run, as ``spectrum.json`` with ``complete: false``.

    No loss, gradient or cross-checks: they would take a pass over the data after the user
    asked to stop. ``_read_resumable`` reads the steps back.
    """
    missing = [step for step in STEPS if step not in results]
    record = _header(args, problem, operator, False, missing)
    if "eigenvalues" in results:
        record["eigenvalues"] = _eigen_section(results["eigenvalues"])
    if "trace" in results:
        record["trace"] = _trace_section(args, results["trace"])
    if "density" in results:
        record["density"] = _density_section(results["density"])
    record.update(_footer(args, settings, timings))
    return record


def _record(
    args: argparse.Namespace,
    problem: _Problem,
    operator: Any,
    results: dict[str, Any],
    timings: dict[str, float],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Everything the run produced, as a JSON-ready dict."""
    import torch

    density = results["density"]
    dim = operator.shape[0]
    loss, gradient = operator.loss_and_gradient()
    mean_eigenvalue, mean_eigenvalue_error = density.moment(1)
    exact_trace = float(operator.trace()) if hasattr(operator, "trace") and callable(operator.trace) else None
    record = _header(args, problem, operator, True, [])
    record["loss_at_weights"] = float(loss)
    record["gradient_norm"] = float(torch.linalg.vector_norm(gradient))
    record["eigenvalues"] = _eigen_section(results["eigenvalues"])
    record["trace"] = {
        **_trace_section(args, results["trace"]),
        "closed_form": exact_trace,
        "slq_estimate": mean_eigenvalue * dim,
        "slq_standard_error": mean_eigenvalue_error * dim,
    }
    record["density"] = _density_section(density)
    record.update(_footer(args, settings, timings))
    return record


# ---------------------------------------------------------------------- resume
class _StoredEigenvalues:
    """The eigenvalue step's result as ``spectrum.json`` keeps it (without eigenvectors)."""

    def __init__(self, section: dict[str, Any]) -> None:
        self.eigenvalues = np.asarray(section["values"], dtype=np.float64)
        self.residual_norms = np.asarray(section["residual_norms"], dtype=np.float64)
        self.converged = np.asarray(section["converged"], dtype=bool)
        self.num_matvecs = int(section["num_matvecs"])
        self.num_restarts = int(section["num_restarts"])


def _read_resumable(path: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """The finished steps in ``path`` and their timings, if it was written with ``settings``.

    Raises
    ------
    UsageError
        No such file, not a ``spectrum.json``, or written with other options (named).
    """
    from curvops import ScalarEstimate, SpectralDensity

    if not path.is_file():
        raise UsageError(f"--resume: no {path} to continue from; run without --resume to start")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--resume: cannot read {path} ({error}); run without --resume to start") from None
    if not isinstance(record, dict) or record.get("format") != "curvops.spectrum/1":
        raise UsageError(f"--resume: {path} is not a curvops spectrum.json; run without --resume to start")
    previous = record.get("settings", {})
    for key in _RESUME_SETTINGS:
        if previous.get(key) != settings[key]:
            option = "-k" if key == "k" else "--" + key.replace("_", "-")
            raise UsageError(
                f"--resume: {path} was written with {option} {_option_text(previous.get(key))}, "
                f"this run has {option} {_option_text(settings[key])}; rerun with the same "
                "options, or without --resume to start again (overwriting it)"
            )
    missing = record.get("missing", [])  # files without the key were complete
    results: dict[str, Any] = {}
    timings = record.get("timings_s", {})
    try:
        if "eigenvalues" not in missing:
            results["eigenvalues"] = _StoredEigenvalues(record["eigenvalues"])
        if "trace" not in missing:
            trace = record["trace"]
            results["trace"] = ScalarEstimate(
                estimate=float(trace["estimate"]),
                # JSON has no NaN: an unknown standard error was written as null.
                standard_error=math.nan
                if trace["standard_error"] is None
                else float(trace["standard_error"]),
                num_matvecs=int(trace["num_matvecs"]),
                exact=bool(trace["exact"]),
            )
        if "density" not in missing:
            results["density"] = SpectralDensity.from_dict(record["density"]["slq"])
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(
            f"--resume: {path} lacks a finished step's numbers ({type(error).__name__}: {error}); "
            "run without --resume to start again"
        ) from None
    return results, {step: float(timings[step]) for step in results if step in timings}


def _check_resumed_problem(path: Path, operator: Any) -> None:
    """Refuse to continue a file written for other parameters (a changed ``--model``)."""
    record = json.loads(path.read_text(encoding="utf-8"))
    names = list(operator.param_names)
    if record.get("num_parameters") != operator.shape[0] or record.get("parameters") != names:
        raise UsageError(
            f"--resume: {path} was written for {record.get('num_parameters')} parameters "
            f"({len(record.get('parameters') or [])} tensors), this model has {operator.shape[0]} "
            f"({len(names)} tensors); rerun without --resume to start again"
        )


def _option_text(value: Any) -> str:
    """An option's value as a user would type it (``None``: not given)."""
    if value is None:
        return "(not given)"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


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


def _summary(record: dict[str, Any], written: list[Path], resumed: Sequence[str] = ()) -> str:
    """The human-readable summary printed at the end of a run (``resumed``: steps read back)."""
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
    parts = [
        f"{key} {value:.1f} s" + (" (earlier run)" if key in resumed else "")
        for key, value in timings.items()
        if key != "total"
    ]
    total = "total of this run" if resumed else "total"
    lines += [
        "",
        "time: " + ", ".join(parts) + f"; {total} {timings.get('total', float('nan')):.1f} s",
        "wrote " + ", ".join(str(path) for path in written),
    ]
    return "\n".join(lines)


def _plot(record: dict[str, Any], results: dict[str, Any], path: Path, *, log_scale: bool) -> None:
    """Density with its ±2 s.e. band, the top eigenvalues marked, the trace in a corner.

    The trace is given with the same ±1 s.e. as the printed summary.
    """
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
    _mark_eigenvalues(ax, eigenvalues)
    ax.set_xlabel(f"eigenvalue λ of {symbol}")
    ax.set_ylabel("spectral density" + (" (log scale)" if log_scale else ""))
    problem = record["problem"]
    # pad: room for the eigenvalue markers and their labels above the top edge
    ax.set_title(
        f"{record['curvature_name']}: {problem['model']}, D = {record['num_parameters']:,}",
        fontsize=10,
        pad=22,
    )
    trace = record["trace"]
    if trace["exact"]:
        text = f"tr({symbol}) = {trace['estimate']:.4g} (exact)"
    else:
        name = {"xtrace": "XTrace", "hutchpp": "Hutch++"}[trace["method"]]
        # The printed summary's wording: one number, one uncertainty, wherever it is read.
        text = (
            f"tr({symbol}) = {_format_uncertain(trace['estimate'], trace['standard_error'])}\n"
            f"(1 s.e.; {name}, {trace['num_matvecs']} matvecs)"
        )
    text += f"\nλ_max = {eigenvalues[0]:.4g}"
    ax.text(
        0.98,
        0.96,
        text,
        gid="trace-summary",
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


def _mark_eigenvalues(ax: Any, eigenvalues: list[float]) -> None:
    """Mark the top eigenvalues on ``ax``: the largest few labelled, the rest fainter and thinned.

    The eigenvalues below the top few often sit at the edge of the bulk, closer together than
    a marker is wide; drawn alike, they merge into one smudge that hides the labelled ones.
    """
    x0, x1 = ax.get_xlim()
    width = x1 - x0 if x1 > x0 else 1.0
    # Separations in fractions of the axis width: a label ("λ10" at 7 pt) and a marker.
    label_gap, marker_gap = 0.06, 0.015
    labelled: list[float] = []
    drawn: list[float] = []
    for rank, value in enumerate(eigenvalues, 1):
        where = (value - x0) / width
        if len(labelled) < _LABELLED_EIGENVALUES and all(abs(where - f) >= label_gap for f in labelled):
            labelled.append(where)
            drawn.append(where)
            linewidth, alpha, linestyle, markersize = 0.8, 0.7, "--", 5.0
            ax.annotate(
                rf"$\lambda_{{{rank}}}$",
                (value, 1.0),
                xycoords=ax.get_xaxis_transform(),
                xytext=(0, 6),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color="C3",
                gid="eigenvalue-label",
            )
        elif all(abs(where - f) >= marker_gap for f in drawn):
            drawn.append(where)
            linewidth, alpha, linestyle, markersize = 0.6, 0.4, ":", 3.5
        else:
            continue
        ax.axvline(value, color="C3", linewidth=linewidth, alpha=alpha, linestyle=linestyle)
        ax.plot(
            [value],
            [1.0],
            transform=ax.get_xaxis_transform(),
            linestyle="none",
            marker="v",
            color="C3",
            markersize=markersize,
            alpha=min(1.0, 2 * alpha),
            clip_on=False,
            gid="eigenvalue-marker",
        )
    # One legend entry for all of them (an invisible line carries its style).
    ax.plot(
        [],
        [],
        color="C3",
        linewidth=0.8,
        alpha=0.7,
        linestyle="--",
        label=f"top-{len(eigenvalues)} eigenvalues"
        + (f" ({len(drawn)} drawn)" if len(drawn) < len(eigenvalues) else ""),
    )


if __name__ == "__main__":  # pragma: no cover - `python -m curvops.cli`
    sys.exit(main())
