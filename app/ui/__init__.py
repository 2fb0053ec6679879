"""The web console at /ui: datasets, jobs with live training curves, models, and a query box.

Plain HTML, CSS and JavaScript served by the app (no build step, no CDN); the charts are drawn by plotly.js, the
file the `plotly` Python package ships, served from here too. The pages call the public API from the browser
(with the API key, when the service has one, kept in the tab's sessionStorage), so the console can do nothing a
client of the API cannot.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

from app.docs import static_app

UI_DIR = Path(__file__).resolve().parent / "static"
UI_STATIC_URL = "/ui/static"
VENDOR_URL = "/ui/vendor"
JOB_ID = re.compile(r"[0-9a-f]{32}")


def plotly_dir() -> Path:
    """Where the `plotly` Python package keeps plotly.min.js (what its offline HTML export embeds)."""
    return Path(str(files("plotly") / "package_data"))


def _page(name: str) -> FileResponse:
    return FileResponse(UI_DIR / name, media_type="text/html", headers={"Cache-Control": "no-cache"})


def install_ui(app: FastAPI) -> None:
    app.mount(UI_STATIC_URL, static_app(UI_DIR), name="ui-static")
    app.mount(VENDOR_URL, static_app(plotly_dir()), name="ui-vendor")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    @app.get("/ui", include_in_schema=False)
    def console() -> FileResponse:
        return _page("index.html")

    @app.get("/ui/jobs/{job_id}", include_in_schema=False)
    def console_job(job_id: str) -> FileResponse:
        if not JOB_ID.fullmatch(job_id):  # the page itself asks the API for the job (with the user's key)
            raise HTTPException(404, f"no job page for {job_id[:64]!r}: job ids are 32 hex digits")
        return _page("job.html")
