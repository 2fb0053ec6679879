"""Swagger UI (/docs) and ReDoc (/redoc) served with their JavaScript and CSS from this service, never a CDN, so
they render on a network with no way out.

The assets come from the `fastapi-offline` package (Swagger UI 5, which renders the OpenAPI 3.1 document FastAPI
emits, and ReDoc 2) rather than copies kept in this repository: a dependency upgrade brings their fixes.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware

DOCS_STATIC_URL = "/static/docs"


def docs_assets_dir() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


class CachedStaticFiles(StaticFiles):
    """Static files a browser may keep for an hour (they change only with a package upgrade)."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.setdefault("Cache-Control", "public, max-age=3600")
        return response


def static_app(directory: Path) -> GZipMiddleware:
    """Files of `directory`, gzipped at a fast level for clients that accept it (the chart library and Swagger's
    bundle are megabytes as shipped), cacheable for an hour."""
    return GZipMiddleware(CachedStaticFiles(directory=directory), minimum_size=1024, compresslevel=4)


def install_docs(app: FastAPI) -> None:
    """The app must be built with `docs_url=None, redoc_url=None` (FastAPI's own pages point at a CDN)."""
    app.mount(DOCS_STATIC_URL, static_app(docs_assets_dir()), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + oauth2_redirect_url,
            swagger_js_url=f"{root}{DOCS_STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )
        # ReDoc's "API docs by Redocly" badge is an image on the vendor's CDN (hidden when it fails to load): the
        # page asks for no image from elsewhere, so nothing leaves the browser.
        page.headers["Content-Security-Policy"] = "img-src 'self' data:"
        return page
