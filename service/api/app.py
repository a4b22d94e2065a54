"""The FastAPI app: ``create_app(settings)``; models load in the lifespan (readiness waits for them).

Nothing heavy happens at import; ``uvicorn service.api.app:app`` works too (settings from the
environment). See the README for the API and the settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from service.api import errors, openapi
from service.api.frontdoor import FrontDoor, FrontDoorMiddleware
from service.api.metrics import MetricsMiddleware
from service.api.middleware import HeadAsGetMiddleware, RequestIdMiddleware
from service.api.routes import ops, page, repository, v1, v2
from service.api.state import ServiceState
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own state and metrics registry (several can live in one process)."""
    settings = settings or get_settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(state.start(), name="stn-load-models")
        try:
            yield
        finally:
            loader.cancel()
            await state.stop()

    app = FastAPIOffline(  # /docs and /redoc with their assets served by the app (no CDN): /static-offline-docs
        title="stn",
        summary="Spatial Transformer Networks: upload images, get them rectified.",
        description="Try the served models in a browser on [the demo page](./): upload images, see the "
                    "sampled region and the rectified result.",
        version="0.1.0",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},  # no call to swagger.io's online validator either
    )
    app.state.stn = state
    errors.install(app)
    openapi.install(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(v2.models_router)
    app.include_router(repository.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.mount(page.STATIC_PATH, page.static_files(), name="static")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["*"])
    app.add_middleware(HeadAsGetMiddleware)  # inside the door, which answers HEAD probes itself
    app.state.front_door = FrontDoor(state)  # health, readiness and load shedding before routing and the body;
    app.add_middleware(FrontDoorMiddleware, door=app.state.front_door)  # `stn serve` answers them in its protocol
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries X-Request-ID
    return app


def __getattr__(name: str) -> FastAPI:  # `uvicorn service.api.app:app`: built on first access, not at import
    if name == "app":
        return create_app()
    raise AttributeError(name)
