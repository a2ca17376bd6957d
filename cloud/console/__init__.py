"""The web fleet console: static pages shipped in the package, served by the coordinator.

Nothing is fetched from elsewhere at run time: ``static/`` holds the one HTML shell,
the stylesheet and the scripts (vanilla JS; plots are inline SVG drawn by
``plots.js``). The routes that serve them, and the JSON and live-update endpoints the
pages read, live in :mod:`cloud.api._console`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PAGES", "STATIC"]

#: Where the console's files are (inside the installed package).
STATIC = Path(__file__).resolve().parent / "static"

#: Console pages: each is the same shell; the script draws the view its path names.
PAGES = ("fleet", "device", "models", "rollouts", "rollout", "audit")
