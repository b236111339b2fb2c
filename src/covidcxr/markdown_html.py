"""Markdown (the model cards) as HTML for the web service and the HTML reports."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from covidcxr.errors import MissingExtraError

if TYPE_CHECKING:
    from markdown_it import MarkdownIt


def markdown_html(text: str, *, extra: str) -> str:
    """HTML for CommonMark ``text`` with pipe tables.

    Raw HTML in ``text`` is escaped, never passed through, and links to ``javascript:``
    and similar URLs are not made, so the result is safe to insert into a page.

    Args:
        text: the Markdown.
        extra: the covidcxr extra the error names when markdown-it-py is missing.

    Raises:
        MissingExtraError: markdown-it-py is not installed.
    """
    return str(_parser(extra).render(text))


@cache
def _parser(extra: str) -> MarkdownIt:
    try:
        from markdown_it import MarkdownIt
    except ImportError as exc:
        raise MissingExtraError("markdown-it-py", extra) from exc
    return MarkdownIt("commonmark", {"html": False}).enable("table")
