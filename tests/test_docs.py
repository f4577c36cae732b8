"""Every ```python block of docs/*.md and README.md runs; the site builds with --strict."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
# A fence opening with exactly "python" (not "python notest", not "pycon"): those run.
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SHELL_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of one page run in order in one namespace, as a reader would run them."""
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # blocks that write files write here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    for number, block in enumerate(python_blocks(page), 1):
        code = compile(block, f"{page.name}[block {number}]", "exec")
        exec(code, namespace)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """The site builds with --strict: no broken link, no missing page, no docstring warning."""
    mkdocs = [sys.executable, "-m", "mkdocs"]
    result = subprocess.run(
        [*mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()
    reference = (tmp_path / "site" / "reference" / "index.html").read_text(encoding="utf-8")
    # Every curvature operator's entry documents the arguments it shares with the others in
    # full, not by a pointer to the base class.
    for name in ("HessianOperator", "GGNOperator", "FisherOperator", "KFACOperator", "EKFACOperator"):
        parameters = _reference_parameters(reference, f"curvops.{name}")
        for argument in ("model", "loss_fn", "data", "params"):
            description = parameters.get(argument, "")
            assert len(description) > 40, f"{name}: {argument!r} is documented as {description!r}"
            assert not description.lower().startswith("see "), f"{name}: {argument!r}: {description!r}"


def _reference_parameters(page: str, identifier: str) -> dict[str, str]:
    """Argument name -> description text in the first Parameters table of an API entry."""
    start = page.index(f'id="{identifier}"')
    end = page.find('<h3 id="', start + 1)
    entry = page[start : end if end > 0 else len(page)]
    table = entry.split('<span class="doc-section-title">Parameters:</span>', 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in table.split('<tr class="doc-section-item">')[1:]:
        name = re.search(r"<code>(\w+)</code>", row)
        text = row.split('class="doc-md-description">', 1)[1].split("</div>", 1)[0]
        if name:
            rows[name.group(1)] = " ".join(re.sub(r"<[^>]+>", " ", text).split())
    return rows


def test_benchmarks_page_includes_every_result() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    included = set(re.findall(r'^--8<-- "([^"]+)"$', page, re.MULTILINE))
    missing = [
        p.name for p in sorted((ROOT / "benchmarks" / "results").glob("*.md")) if p.name not in included
    ]
    assert not missing, f"docs/benchmarks.md does not include {missing}"


def _commands(text: str) -> list[str]:
    """The command lines of a shell text: no comments, no blank lines, no shell options."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and not line.startswith("set ")]


def test_ci_runs_the_readme_commands_verbatim() -> None:
    """``.ci/run`` is the README's "Set up" and "Run the tests" commands, in order, nothing else."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    wanted: list[str] = []
    for section in ("## Set up", "## Run the tests"):
        body = readme.split(section, 1)[1].split("\n## ", 1)[0]
        wanted += [cmd for block in SHELL_BLOCK.findall(body) for cmd in _commands(block)]
    ci = _commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    # Before the README's commands: the directory change and the CI environment variable.
    assert ci[: len(ci) - len(wanted)] == ['cd "$(dirname "$0")/.."', 'export CI="${CI:-true}"']
    assert ci[len(ci) - len(wanted) :] == wanted


def test_setup_is_one_command() -> None:
    """The README's "Set up" is one command: the set-up script, which CI runs too."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    body = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [cmd for block in SHELL_BLOCK.findall(body) for cmd in _commands(block)]
    assert commands == [". scripts/setup.sh"]
    assert (ROOT / "scripts" / "setup.sh").is_file()


def test_no_install_command_asks_the_registry_for_curvops() -> None:
    """curvops is not on PyPI: no shell command of the docs installs ``curvops`` or
    ``curvops[extra]`` by name; they install ``.``, a wheel file or the requirement files."""
    offending = []
    for page in [*PAGES, ROOT / "CONTRIBUTING.md"]:
        for block in SHELL_BLOCK.findall(page.read_text(encoding="utf-8")):
            for command in _commands(block):
                for part in re.split(r"&&|;|\|", command.split("#", 1)[0]):
                    words = part.split()
                    if words[:2] != ["pip", "install"] and words[1:4] != ["-m", "pip", "install"]:
                        continue
                    if any(re.fullmatch(r"curvops(\[[\w,]*\])?", w.strip("\"'")) for w in words):
                        offending.append(f"{page.relative_to(ROOT)}: {command}")
    assert not offending, offending
