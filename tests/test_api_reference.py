"""The API reference as a reader sees it: the HTML that ``mkdocs build --strict`` writes.

mkdocstrings renders docstrings as Markdown, so cross-references are autorefs links
(``[`Name`][curvops.Name]``); a Sphinx role (``:class:`Name```) would show as raw text.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: A Sphinx role of the Python domain, in a docstring or as Markdown renders it into HTML.
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):(?:`|<code>)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The HTML of the API reference page, from one strict build of the site."""
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # --strict turns every unresolved cross-reference (an autorefs warning) into a failure.
    assert result.returncode == 0, result.stdout + result.stderr
    return (site / "reference" / "index.html").read_text(encoding="utf-8")


def _entry(page: str, identifier: str) -> str:
    """The HTML of one API entry, from its heading to the next entry of the same level."""
    start = page.index(f'id="{identifier}"')
    end = page.find('<h3 id="', start + 1)
    return page[start : end if end > 0 else len(page)]


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _parameters(entry: str) -> dict[str, tuple[str, str]]:
    """Argument name -> (type, description) of the first Parameters table of an entry."""
    table = entry.split('<span class="doc-section-title">Parameters:</span>', 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in table.split('<tr class="doc-section-item">')[1:]:
        cells = re.findall(r"<td>(.*?)</td>", row, re.DOTALL)
        rows[_text(cells[0])] = (_text(cells[1]), _text(cells[2]))
    return rows


@pytest.mark.slow
def test_reference_shows_no_raw_roles(reference: str) -> None:
    raw = [_text(reference[max(m.start() - 60, 0) : m.end() + 60]) for m in ROLE.finditer(reference)]
    assert not raw, f"raw Sphinx roles in the API reference: {raw[:5]}"


@pytest.mark.slow
def test_hessian_operator_documents_its_shared_parameters(reference: str) -> None:
    """The arguments every operator shares read in full on HessianOperator's own entry."""
    parameters = _parameters(_entry(reference, "curvops.HessianOperator"))
    assert parameters["model"][0] == "Module"
    assert parameters["model"][1].startswith("The network. Its forward takes a batch's inputs")
    assert parameters["params"][0] == "None, str, list of str, or list of parameters"
    for argument in ("model", "loss_fn", "data", "params", "check_deterministic"):
        kind, description = parameters[argument]
        assert kind, f"{argument} has no type"
        assert "See" not in kind, f"{argument}: type {kind!r}"
        assert len(description) > 40, f"{argument}: {description!r}"
        assert not description.startswith("See "), f"{argument}: {description!r}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "operator",
    [
        "curvops.EKFACOperator",
        "curvops.JacobianOperator",
        "curvops.operators.CompiledHessianOperator",
        "curvops.operators.CompiledGGNOperator",
    ],
)
def test_operators_document_their_parameters_in_full(reference: str, operator: str) -> None:
    """No operator documents an argument by a pointer to another entry."""
    parameters = _parameters(_entry(reference, operator))
    for argument in ("model", "data", "params", "check_deterministic"):
        description = parameters[argument][1]
        assert len(description) > 60, f"{operator}: {argument}: {description!r}"
        assert not description.startswith("See "), f"{operator}: {argument}: {description!r}"
        assert "as for " not in description, f"{operator}: {argument}: {description!r}"


@pytest.mark.slow
def test_cross_references_link_within_the_reference(reference: str) -> None:
    """Cross-references are links, and every in-page link lands on an entry of the page."""
    anchors = set(re.findall(r'id="([^"]+)"', reference))
    links = re.findall(r'<a class="autorefs autorefs-internal"[^>]*href="#([^"]+)"', reference)
    assert len(links) > 50, f"only {len(links)} cross-reference links in the API reference"
    assert {"curvops.ProductStrategy", "curvops.CurvatureOperator", "curvops.lanczos"} <= set(links)
    assert set(links) <= anchors, f"links to missing entries: {sorted(set(links) - anchors)}"
    # An unresolved reference would be left as its Markdown source.
    assert "][curvops." not in reference
    # HessianOperator's description of ``strategy`` links to ProductStrategy's entry.
    strategy = _parameters(_entry(reference, "curvops.HessianOperator"))["strategy"][1]
    assert "ProductStrategy" in strategy
    hessian = _entry(reference, "curvops.HessianOperator")
    assert 'href="#curvops.ProductStrategy"' in hessian
