"""Bias report: subgroup metrics, gaps and confounder screens of a federated run."""

from radfed.bias.render import render_html

__all__ = ["render_html"]
