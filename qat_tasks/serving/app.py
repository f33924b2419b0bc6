"""The HTTP layer of the serving component (FastAPI on uvicorn); every route calls into `Service`.

  POST /v1/intent          {"text", "conversation_id"?, "turn"?, "request_id"?, "locale"?} -> intent, confidence
  POST /v1/escalation      the same fields -> p_frustrated, escalate (at the model's recall-tuned threshold)
  POST /v1/rerank          {"query", "candidates": [{"text", "id"?}], "top_k"?, ...} -> the top k, best first
  GET  /health             versions served per model, mirroring on/off, the shadow process's state
  GET  /metrics            Prometheus text: requests, champion and shadow latency histograms, mirrored / answered /
                           errors / timeouts / dropped mirrors, agreements, log records
  POST /admin/mirroring    {"enabled": bool}                       (Authorization: Bearer $QAT_SERVING_ADMIN_TOKEN)
  POST /admin/reload       re-resolve the aliases now (they are also polled every serving.reload_interval_s)

Admin routes need the bearer token of the environment variable QAT_SERVING_ADMIN_TOKEN, compared in constant time;
without the variable they are refused (503), never open.

Run it with `python -m qat_tasks.serving [--model NAME ...]` (every served encoder of the config by default).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os
import socket
import sys

from fastapi import BackgroundTasks  # at module level: the routes' annotations are resolved here
from pydantic import BaseModel, ConfigDict

from qat_tasks.core.config import ConfigError, PipelineConfig, load_config
from qat_tasks.serving.models import ServingError
from qat_tasks.serving.requests import EscalationRequest, IntentRequest, RerankRequest
from qat_tasks.serving.service import NotHosted, Service

__all__ = ["IntentRequest", "EscalationRequest", "RerankRequest", "create_app", "make_server", "serve", "main"]

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "QAT_SERVING_ADMIN_TOKEN"


class MirroringSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool


def admin_guard(token: str | None):
    """A FastAPI dependency that lets a request through only with `Authorization: Bearer <token>`."""
    from fastapi import Header, HTTPException

    expected = token.encode() if token else None

    def check(authorization: str | None = Header(default=None)) -> None:
        if expected is None:
            raise HTTPException(503, f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV} in the service's "
                                     f"environment and send it as 'Authorization: Bearer <token>'")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(401, f"admin endpoints need 'Authorization: Bearer <{ADMIN_TOKEN_ENV}>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(403, "wrong admin token")

    return check


class PausesShadow:
    """ASGI middleware: the shadow process is held paused from the moment a request to /v1/ reaches the app until
    its answer has been sent and its record handed on (`Mirror.hold`, serving.shadow_yield), so the shadow's
    compute never runs beside any part of a champion request, only in the gaps between them."""

    def __init__(self, app, service: Service):
        self.app, self.mirror = app, service.mirror

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        self.mirror.hold()
        try:
            return await self.app(scope, receive, send)
        finally:
            self.mirror.release()


def create_app(service: Service, admin_token: str | None = None):
    """The routes; `admin_token` defaults to $QAT_SERVING_ADMIN_TOKEN (unset or empty: admin routes refused)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from qat_tasks.serving.metrics import CONTENT_TYPE

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # flushes the last log records, stops the shadow process

    app = FastAPI(title="MangaAssist encoder service", description=__doc__, lifespan=lifespan)
    app.add_middleware(PausesShadow, service=service)
    admin = [Depends(admin_guard(admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)))]

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            problems.append(f"{field}: unknown field" if err["type"] == "extra_forbidden" else f"{field}: {err['msg']}")
        return JSONResponse(status_code=422, content={"error": "; ".join(problems),
                                                      "detail": jsonable_encoder(exc.errors())})

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)

    @app.exception_handler(NotHosted)
    async def not_hosted(request: Request, exc: NotHosted) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": str(exc)})

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("request to %s failed: %s: %s", request.url.path, type(exc).__name__, exc)
        return JSONResponse(status_code=500, content={"error": f"the champion failed: {type(exc).__name__}"})

    # Plain defs: FastAPI runs them on its thread pool, off the event loop. Logging and the hand-over to the shadow
    # run as background tasks, once the answer has been sent.
    @app.post("/v1/intent")
    def intent(req: IntentRequest, after: BackgroundTasks) -> dict:
        return service.answer(req, after.add_task)

    @app.post("/v1/escalation")
    def escalation(req: EscalationRequest, after: BackgroundTasks) -> dict:
        return service.answer(req, after.add_task)

    @app.post("/v1/rerank")
    def rerank(req: RerankRequest, after: BackgroundTasks) -> dict:
        return service.answer(req, after.add_task)

    @app.get("/health")
    def health() -> dict:
        return service.health()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics_text(), media_type=CONTENT_TYPE)

    @app.post("/admin/mirroring", dependencies=admin)
    def mirroring(switch: MirroringSwitch) -> dict:
        if switch.enabled != service.mirroring:
            log.info("mirroring turned %s", "on" if switch.enabled else "off")
        service.mirroring = switch.enabled
        return service.health()

    @app.post("/admin/reload", dependencies=admin)
    def reload():
        try:
            return service.reload()
        except Exception as exc:  # the old versions keep serving; say why the new ones did not load
            log.warning("reload failed: %s: %s", type(exc).__name__, exc)
            return JSONResponse(status_code=503, content={"error": f"reload failed ({type(exc).__name__}: {exc}); "
                                                                   f"still serving the loaded versions",
                                                          **service.health()})

    return app


def make_server(service: Service, host: str, port: int, admin_token: str | None = None):
    """A uvicorn server for the service and the socket it will listen on (bound now: port 0 picks a free port,
    and the URL is known before serving starts). Returns (server, socket, url)."""
    import uvicorn

    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    config = uvicorn.Config(create_app(service, admin_token), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    bound = sock.getsockname()[1]
    return uvicorn.Server(config), sock, f"http://{f'[{host}]' if ':' in host else host}:{bound}"


def serve(cfg: PipelineConfig, models: str | list[str] | None = None, host: str | None = None,
          port: int | None = None, mirror: bool = True) -> None:
    """Run the service until interrupted (SIGINT/SIGTERM flush the logs and stop the shadow process)."""
    # A request waiting for the GIL while another of this process's threads runs Python (the event loop, the log
    # flusher, the shadow monitor) waits up to the switch interval: 0.5 ms instead of 5 ms.
    sys.setswitchinterval(0.0005)
    if not os.environ.get(ADMIN_TOKEN_ENV):
        log.warning("%s is not set: the admin endpoints (/admin/*) refuse every request", ADMIN_TOKEN_ENV)
    service = Service(cfg, models, mirror, idle_shadow=True)
    server, sock, url = make_server(service, host or cfg.serving.host, cfg.serving.port if port is None else port)
    print(f"listening on {url} (GET {url}/health)", flush=True)
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat_tasks.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config (default: $QAT_CONFIG, else configs/demo.yaml)")
    parser.add_argument("--model", action="append", help="configured model to host (repeatable); default: every "
                                                         "served encoder of the config")
    parser.add_argument("--host", help="default: serving.host")
    parser.add_argument("--port", type=int, help="default: serving.port (0: any free port)")
    parser.add_argument("--no-mirror", action="store_true", help="start with mirroring off (POST /admin/mirroring)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        serve(load_config(args.config), args.model, args.host, args.port, not args.no_mirror)
    except (ConfigError, ServingError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
