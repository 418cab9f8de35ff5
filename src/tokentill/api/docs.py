"""`GET /docs`: Swagger UI from files inside the package, so the page works on a machine without internet.

The files are swagger-ui-dist 5 (Apache-2.0, its LICENSE and NOTICE beside them) under `api/static/swagger/`,
served at `/static/swagger/`. The validator badge (which would call swagger.io) is switched off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

__all__ = ["STATIC_DIR", "docs_router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

docs_router = APIRouter(include_in_schema=False)


@docs_router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title="tokentill API",
        swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/console/favicon.svg",
        swagger_ui_parameters={"validatorUrl": None},
    )
