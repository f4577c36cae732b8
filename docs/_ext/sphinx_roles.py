"""Griffe extension for the API reference: Sphinx cross-reference roles as inline code.

The docstrings are numpydoc, whose cross-references are Sphinx roles
(:class:`~curvops.HessianOperator`, :meth:`matvec`). mkdocstrings renders Markdown, where a
role would show as literal text; this extension rewrites each role as the inline code a
reader sees in Sphinx's output: the target (``curvops.HessianOperator``), its last
component with a leading ``~`` (``HessianOperator``), or the explicit title of
``title <target>``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

#: A Sphinx role of the Python domain with its content, e.g. :class:`~curvops.HessianOperator`.
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj|const):`([^`]+)`")


def _as_code(match: re.Match[str]) -> str:
    """The inline code Sphinx would display for one role."""
    content = match.group(1).strip()
    titled = re.fullmatch(r"(.+?)\s*<[^>]+>", content)
    if titled:
        return f"`{titled.group(1)}`"
    if content.startswith("~"):
        return f"`{content[1:].rsplit('.', 1)[-1]}`"
    return f"`{content.lstrip('.!')}`"


def rewrite_roles(text: str) -> str:
    """Replace every Sphinx role by inline code.

    Parameters
    ----------
    text : str
        A docstring.

    Returns
    -------
    str
        ``text`` with ``:role:`target``` written as Sphinx would display it, in backticks.
    """
    return ROLE.sub(_as_code, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every docstring of ``pkg`` once, after the whole package is loaded.

        Parameters
        ----------
        pkg : griffe.Module
            The loaded package (``curvops``).
        **kwargs : Any
            The other arguments griffe passes to extensions (unused).
        """
        seen: set[int] = set()
        pending: list[griffe.Object | griffe.Alias] = [pkg]
        while pending:
            obj = pending.pop()
            if id(obj) in seen or obj.is_alias:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite_roles(obj.docstring.value)
            pending.extend(obj.members.values())
