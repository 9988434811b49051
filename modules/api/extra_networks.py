"""The Extra Networks browser's preview images: ``GET sd_extra_networks/thumb`` (A1111's route name).

Mounted inside the UI's Gradio app (webui.create_app), so it sits behind the UI's login like the page
whose cards show it. A preview is served only from inside the network roots: by ``page`` + ``item`` (a
card's relative path; the preview is found beside it) or, as A1111 clients ask, by ``filename`` (an image
file inside a root). Anything else, ``..`` and symlinks out of a root included, is 404.
"""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute

from modules.core.extra_networks import allowed_preview_file, default_pages, resolve_preview

THUMB_PATH = "/sd_extra_networks/thumb"


def install_preview_routes(app: Any, services: Any) -> None:
    """Add the thumb route in front of `app`'s routes (the Gradio app's catch-alls come later)."""
    pages = {p.id: p for p in default_pages(services.paths, services.cmd_opts)}

    def thumb(page: str = "", item: str = "", filename: str = "") -> FileResponse:
        if filename:
            path = allowed_preview_file(pages.values(), filename)
        else:
            path = resolve_preview(pages[page], item) if page in pages else None
        if path is None:
            raise HTTPException(status_code=404, detail="No such preview")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    app.router.routes.insert(0, APIRoute(THUMB_PATH, thumb, methods=["GET"]))
