"""Griffe extension for the API reference: a Sphinx role in a docstring fails the build.

mkdocstrings renders docstrings as Markdown, where a Sphinx role (:class:`HessianOperator`)
shows as raw text. Cross-references are autorefs links instead:
[`HessianOperator`][curvops.HessianOperator], or plain ``code`` where the target has no
entry of its own. The check reads the docstrings Python shows, after the operators'
shared parameters and notes are substituted into them, and warns for each role, which
``mkdocs build --strict`` turns into an error.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

#: A Sphinx role of the Python domain with its content, e.g. :class:`~curvops.HessianOperator`.
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj|const):`([^`]+)`")


def sphinx_roles(text: str) -> list[str]:
    """The Sphinx roles of a docstring.

    Parameters
    ----------
    text : str
        A docstring.

    Returns
    -------
    list of str
        Each role as written, e.g. ``:class:`~curvops.HessianOperator```, in order.
    """
    return [match.group(0) for match in ROLE.finditer(text)]


class SphinxRoles(griffe.Extension):
    """Warn for every Sphinx role in the docstrings of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Check every docstring of ``pkg`` once, after the whole package is loaded.

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
                for role in sphinx_roles(obj.docstring.value):
                    griffe.logger.warning(
                        "%s: Sphinx role %s renders as raw text; write a Markdown cross-reference, "
                        "[`Name`][curvops.Name], or ``code`` where the target has no entry",
                        obj.path,
                        role,
                    )
            pending.extend(obj.members.values())
