"""The web console at `/console/`: customers (signed in with an API key) see their balance, usage charts,
keys and request log, and redeem codes; the operator (signed in with the admin key) sees every account,
grants credits, creates codes and watches usage, revenue, engines and errors.

`routes` (HTTP), `views` and `operator` (what each page shows and each form does), `charts` (SVG
geometry), `session` (signed cookies, CSRF), `forms` (form fields); templates in `templates/`, CSS and JS
in `api/static/console/`.
"""

from __future__ import annotations

from tokentill.api.console.routes import console_router

__all__ = ["console_router"]
