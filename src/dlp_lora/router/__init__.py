"""Routers (prompt -> task probabilities) and selection (probabilities -> Routing)."""

from .model import Router
from .selection import plain_select_row, select, select_with

__all__ = ["Router", "select", "select_with", "plain_select_row"]
