# shellcheck shell=sh
# The development environment in one command (README.md, "Set up"), from the repository root:
#
#     . scripts/setup.sh
#
# creates .venv (or completes an existing one), installs torch, curvops with its `test` extra
# (editable) and the peer libraries that the tests use as oracles, and leaves .venv active in
# the calling shell. `bash scripts/setup.sh` does the same without activating; running it again
# installs only what is missing.
#
# Which torch:
#   - the one .venv already holds, if any (so a torch chosen by hand is kept);
#   - else CURVOPS_TORCH, pip's arguments for it, if set: CURVOPS_TORCH="torch==2.15.0" or
#     CURVOPS_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128";
#   - else the release the suite is tested with (CURVOPS_TORCH_VERSION, default below):
#     on Linux without an NVIDIA GPU its CPU build, looked for on pip's configured indexes
#     first (a local wheel, a mirror) and then on PyTorch's CPU index, because PyPI's Linux
#     wheel is the CUDA build, whose CUDA libraries (about 3 GB) such a machine cannot use;
#     with an NVIDIA GPU, or on macOS and Windows, PyPI's build for the machine.
#
# Sourced, the script must leave no shell option or variable behind in the caller's shell: the work
# runs in a subshell with its own `set -eu`, and only the activation runs in the caller's shell.
# (`( ... ) || return` would switch `set -e` off inside the subshell, hence the saved status.)

(
    set -eu
    tested_torch="${CURVOPS_TORCH_VERSION:-2.13.0}"
    cpu_index="https://download.pytorch.org/whl/cpu"

    if ! grep -qs '^name = "curvops"' pyproject.toml; then
        echo "scripts/setup.sh: run it from the root of the curvops repository" \
            "(cd path/to/curvops && . scripts/setup.sh)" >&2
        exit 2
    fi
    python="${PYTHON:-python3}"
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "scripts/setup.sh: no Python interpreter '$python' found; curvops needs Python 3.10" \
            "or newer. Name one: PYTHON=python3.11 . scripts/setup.sh" >&2
        exit 2
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "scripts/setup.sh: curvops needs Python 3.10 or newer; '$python' is" \
            "$("$python" --version 2>&1). Name a newer one: PYTHON=python3.11 . scripts/setup.sh" >&2
        exit 2
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "scripts/setup.sh: creating .venv with $("$python" --version 2>&1)"
        "$python" -m venv .venv
    fi
    pip() { .venv/bin/python -m pip "$@"; }

    if .venv/bin/python -c 'import torch' 2>/dev/null; then
        echo "scripts/setup.sh: keeping the torch in .venv" \
            "($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
    elif [ -n "${CURVOPS_TORCH:-}" ]; then
        # Word splitting is wanted: CURVOPS_TORCH holds pip arguments.
        # shellcheck disable=SC2086
        pip install $CURVOPS_TORCH
    elif [ "$(uname -s)" = Linux ] && ! nvidia-smi -L >/dev/null 2>&1; then
        echo "scripts/setup.sh: no NVIDIA GPU: installing the CPU build of torch $tested_torch"
        if ! pip install "torch==$tested_torch+cpu"; then
            echo "scripts/setup.sh: no CPU build on pip's configured indexes; trying $cpu_index"
            if ! pip install "torch==$tested_torch+cpu" --extra-index-url "$cpu_index"; then
                echo "scripts/setup.sh: no CPU build of torch $tested_torch found. Choose a torch:" \
                    "CURVOPS_TORCH='torch==$tested_torch' . scripts/setup.sh (PyPI's CUDA build)," \
                    "or install one into .venv first and run the script again" >&2
                exit 1
            fi
        fi
    else
        pip install "torch==$tested_torch"
    fi

    # Installing the rest must not replace the torch chosen above (a dependency asking for
    # another version fails here, naming the conflict, instead of pulling a 3 GB CUDA build).
    .venv/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' \
        >.venv/curvops-torch-constraint.txt
    pip install -c .venv/curvops-torch-constraint.txt -e ".[test]" -r requirements/peers.txt
    # backpack-for-pytorch requires torchvision, which neither it nor curvlinops imports on the
    # paths the tests use, and whose wheels pin a torch of their own: these two come without
    # their dependencies (the ones they need are in requirements/peers.txt).
    pip install -c .venv/curvops-torch-constraint.txt --no-deps -r requirements/peers-no-deps.txt

    .venv/bin/python -c 'import curvops, torch; print(
        f"scripts/setup.sh: done: curvops {curvops.__version__}, torch {torch.__version__}"
        f" (CUDA: {torch.cuda.is_available()}) in .venv")'
)
_curvops_setup_status=$?
if [ "$_curvops_setup_status" -ne 0 ]; then
    # `return` ends a sourced script; an executed one has nothing to return from and exits.
    # (eval expands the status before the variable is unset.)
    eval "unset _curvops_setup_status; return $_curvops_setup_status 2>/dev/null || exit $_curvops_setup_status"
fi
unset _curvops_setup_status
. .venv/bin/activate
