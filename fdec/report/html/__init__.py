"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) of a build.

One module per part: page (the document and its stylesheet), summary (cards, warnings),
passes, serving (capacity, estimate, engines, measured speed, environment), charts (SVG) and
text (how values are written).
"""

from __future__ import annotations

from fdec.report.html.page import HTML_FILE, render_html
from fdec.report.html.passes import table_stats
from fdec.report.html.summary import warnings

__all__ = ["HTML_FILE", "render_html", "table_stats", "warnings"]
