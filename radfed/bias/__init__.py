"""The bias report of a federated run: subgroup estimates, gaps, confounder screens, figures.

Built centrally from the subgroup cells the sites sent (``report``), rendered as one
self-contained HTML page (``html``) with its figures (``figures``).
"""

from radfed.bias.html import render_html
from radfed.bias.report import build_report

__all__ = ["build_report", "render_html"]
