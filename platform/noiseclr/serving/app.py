"""The edit endpoint: one Ray Serve deployment with a FastAPI ingress.

    noiseclr serve --config jobs/serve-shapes.yaml                 # local Ray, 127.0.0.1:8000
    serve run noiseclr.serving.app:build_app config=jobs/serve-shapes.yaml
    serve deploy jobs/serve-shapes.serve.yaml                      # a Serve config file

Each replica holds the pipeline and the loaded banks. Concurrent edit requests meet in
`@serve.batch` and go through the UNet together (`EditEngine.run`); `num_replicas: auto` scales
replicas on ongoing requests. Banks given as models:/NAME@ALIAS follow their alias: a promoted
version is loaded by every running replica within `alias_poll_s`, without a restart; a new
`user_config` from `serve deploy` (another set of banks) reconfigures replicas the same way.
Metrics (requests, latency, batch size, errors) go through Ray's metrics (Prometheus format on
the Ray metrics export port).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime
# (a string "Request" annotation in a Serve class-based view becomes a query parameter).
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from noiseclr.errors import ConfigError, ImageError, UserError
from noiseclr.serving.admission import Admission
from noiseclr.serving.config import ServeConfig
from noiseclr.serving.proxy import SHED_HEADER, proxy_env
from noiseclr.serving.schema import Bank, Direction, EditRequest, EditResponse, LabelRequest, check_limits
from noiseclr.utils.raycluster import init_ray

log = logging.getLogger(__name__)
api = FastAPI(
    title="NoiseCLR edit API",
    version="1",
    description="Edit generated or uploaded images with directions discovered by NoiseCLR.",
)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status, self.message, self.headers = status, message, headers


@api.exception_handler(HTTPError)
async def _http_error(_: Request, err: HTTPError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


HEADER_LIMIT = 16384  # bytes of request headers, all together (the body has max_body_bytes)


@api.middleware("http")
async def _header_limit(request: Request, call_next):
    """Limits hold for the whole request: oversized headers get a 431 before any route runs."""
    size = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
    if size > HEADER_LIMIT:
        return JSONResponse(
            {"error": f"request headers of {size} bytes; at most {HEADER_LIMIT}"}, status_code=431
        )
    return await call_next(request)


@api.exception_handler(StarletteHTTPException)
async def _starlette_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and missing methods (405) answer like every other error."""
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": _first_error(err.errors())}, status_code=422)


def _first_error(errors) -> str:
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    return f"{where}: {e.get('msg')}"


def key_hashes(cfg: ServeConfig) -> list[str]:
    """sha256 of each configured API key (from the environment); keys themselves never leave it."""
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    return [hashlib.sha256(k.encode()).hexdigest() for k in keys]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes whether or not Content-Length is honest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"body of {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _metrics():
    from ray.serve.metrics import Counter, Histogram

    return {
        "requests": Counter(
            "noiseclr_edit_requests", "HTTP requests by route and status", tag_keys=("route", "status")
        ),
        "latency": Histogram(
            "noiseclr_edit_latency_s",
            "Edit request latency (s)",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64],
            tag_keys=("route",),
        ),
        "batch": Histogram(
            "noiseclr_edit_batch_size",
            "Requests per batched sampling call",
            boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32],
        ),
        "errors": Counter("noiseclr_edit_errors", "Refused or failed requests by kind", tag_keys=("kind",)),
        "thumbnails": Counter(
            "noiseclr_thumbnail_chunks", "Thumbnail sampling calls (a chunk of a bank)", tag_keys=("bank",)
        ),
    }


@serve.deployment(name="EditServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(api)
class EditServer:
    def __init__(self, config: dict[str, Any], key_hashes: list[str] | None = None):
        import torch

        from noiseclr.serving.engine import EditEngine

        self.cfg = ServeConfig(**config)
        threads = self.cfg.replicas.torch_threads or max(1, int(self.cfg.replicas.num_cpus))
        torch.set_num_threads(threads)
        self.engine = EditEngine(self.cfg)
        bound = self.cfg.replicas.latency_bound_s
        self.admission = Admission(bound, self.cfg.batching.max_batch_size) if bound else None
        self.keys = list(key_hashes or [])
        self.metrics = _metrics()
        self.engine.on_thumbnail_chunk = lambda bank: self.metrics["thumbnails"].inc(tags={"bank": bank})
        self._edit_batch.set_max_batch_size(self.cfg.batching.max_batch_size)
        self._edit_batch.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)
        self.started = time.time()
        self.node = ray.get_runtime_context().get_node_id()  # which Ray node answered (ops, tests)
        self._polled, self._poll = time.monotonic(), None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new user_config (e.g. a bank alias moved): load the banks it names, then swap."""
        banks = user_config.get("banks")
        if banks and banks != self.engine.store.sources:
            self.engine.reload(banks)
            log.warning("reconfigured: banks %s", banks)

    async def check_health(self) -> None:
        """Serve calls this every few seconds; it also starts the alias check when one is due."""
        if not self.engine.store.banks:
            raise RuntimeError("no banks loaded")
        poll = self.cfg.alias_poll_s
        if poll and time.monotonic() - self._polled > poll and (self._poll is None or self._poll.done()):
            self._polled = time.monotonic()
            self._poll = asyncio.create_task(self._follow_aliases())

    async def _follow_aliases(self) -> None:
        try:
            await asyncio.to_thread(self.engine.follow_aliases)
        except Exception:  # the registry is down: keep serving what is loaded, try again later
            log.exception("could not check the bank aliases")

    # --- helpers --------------------------------------------------------------------------
    def _key_ok(self, request: Request) -> bool:
        given = request.headers.get("x-api-key", "")
        digest = hashlib.sha256(given.encode()).hexdigest()
        # compare against every key, always, in constant time per comparison
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(digest, key)
        return ok

    def _auth(self, request: Request) -> None:
        if not self.keys:
            return
        if not self._key_ok(request):
            self.metrics["errors"].inc(tags={"kind": "auth"})
            raise HTTPError(401, "missing or wrong API key (header X-API-Key)")

    def _count(self, route: str, status: int) -> None:
        self.metrics["requests"].inc(tags={"route": route, "status": str(status)})

    def _user_error(self, err: UserError) -> HTTPError:
        from noiseclr.serving.engine import NotFound

        if isinstance(err, NotFound):
            kind, status = "not_found", 404
        elif isinstance(err, ImageError) and "refused" in str(err):
            kind, status = "too_large", 413
        else:
            kind, status = "invalid", 422
        self.metrics["errors"].inc(tags={"kind": kind})
        return HTTPError(status, str(err))

    # --- batched model call ---------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _edit_batch(self, jobs: list) -> list:
        """Each request's (PNG, size of the batch it ran in), or its exception."""
        self.metrics["batch"].observe(len(jobs))
        began = time.perf_counter()
        results = await asyncio.to_thread(self.engine.run, jobs)  # each its PNG or its own error
        if self.admission is not None:
            self.admission.observe(sum(job.units for job in jobs), time.perf_counter() - began)
        return [r if isinstance(r, Exception) else (r, len(jobs)) for r in results]

    def _full(self) -> bool:
        """Whether the backlog leaves no room for a default request (one edit at default_steps):
        then the proxy may refuse the route's requests for a moment without asking."""
        return self.admission.full(2 * self.cfg.default_steps)

    def _admit(self, units: int) -> None:
        """Count a request of `units` as pending, if the replica expects to answer it within the
        latency bound; else 503 with Retry-After at once (serving/admission.py)."""
        if self.admission is None:
            return
        wait = self.admission.admit(units)
        if wait is not None:
            self.metrics["errors"].inc(tags={"kind": "shed"})
            bound = self.cfg.replicas.latency_bound_s
            raise HTTPError(
                503,
                f"busy: this edit would be answered in about {wait + bound:.0f} s, past the "
                f"server's bound of {bound:g} s; retry in {wait} s",
                # the proxy repeats the refusal only when any request would get it
                {"Retry-After": str(wait), **({SHED_HEADER: "replica"} if self._full() else {})},
            )

    # --- routes ---------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        html = resources.files("noiseclr.serving").joinpath("static/index.html").read_text()
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @api.get("/v1/health")
    async def health(self, request: Request) -> dict:
        """Liveness for anyone; the replica's details (banks, their sources and versions, pid)
        only with a valid key, or on a server that needs none."""
        if self.keys and not self._key_ok(request):
            return {"status": "ok"}
        store = self.engine.store
        return {
            "status": "ok",
            "banks": sorted(store.banks),
            "sources": {n: r if r.startswith("models:/") else Path(r).name for n, r in store.sources.items()},
            "versions": store.versions,
            "pid": os.getpid(),
            "node": self.node,
            "up_s": round(time.time() - self.started, 1),
            "auth": bool(self.keys),
        }

    @api.get("/v1/banks", response_model=list[Bank])
    async def banks(self, request: Request) -> list[dict]:
        self._auth(request)
        self._count("banks", 200)
        return [self.engine.store.describe(name) for name in sorted(self.engine.store.banks)]

    @api.get("/v1/banks/{bank}/directions", response_model=list[Direction])
    async def directions(self, bank: str, request: Request) -> list[dict]:
        self._auth(request)
        try:
            rows = self.engine.store.directions(bank)
        except UserError as err:
            raise self._user_error(err) from None
        base = str(request.url_for("thumbnail", bank=bank, direction="0")).rsplit("/0/", 1)[0]
        self._count("directions", 200)
        return [{**row, "thumbnail": f"{base}/{row['index']}/thumbnail.png"} for row in rows]

    @api.get("/v1/banks/{bank}/directions/{direction}/thumbnail.png", name="thumbnail")
    async def thumbnail(self, bank: str, direction: str, request: Request) -> Response:
        """The direction at the thumbnail scales (-2, 0, +2 units by default) from seed 0."""
        self._auth(request)
        try:
            i = self.engine.store.index(bank, direction)
            strips = await asyncio.to_thread(self.engine.thumbnails, bank)
        except UserError as err:
            raise self._user_error(err) from None
        return Response(strips[i], media_type="image/png", headers={"Cache-Control": "max-age=60"})

    @api.put("/v1/banks/{bank}/directions/{direction}/label", response_model=Direction)
    async def set_label(self, bank: str, direction: str, request: Request) -> dict:
        """Set a direction's human label (an empty label clears it). Needs the API key when set."""
        self._auth(request)
        body = await read_body(request, 4096)
        try:
            label = LabelRequest.model_validate_json(body).label.strip()
        except ValidationError as err:
            raise HTTPError(422, _first_error(err.errors())) from None
        if len(label) > self.cfg.limits.max_label_chars or any(ord(c) < 32 for c in label):
            raise HTTPError(
                422, f"label: printable text of at most {self.cfg.limits.max_label_chars} characters"
            )
        try:
            row = self.engine.store.set_label(bank, direction, label)
        except UserError as err:
            raise self._user_error(err) from None
        self._count("label", 200)
        base = str(request.url).rsplit("/label", 1)[0]
        return {**row, "thumbnail": f"{base}/thumbnail.png"}

    @api.post(
        "/v1/edits",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EditRequest.model_json_schema()}},
            }
        },
    )
    async def edit(self, request: Request) -> Response:
        """Edit a generated image (seed, optional prompt) or an uploaded one (base64 `image`).
        Returns the PNG (metadata in the X-Edit-Meta header) or, with format=json, both as JSON."""
        started = time.perf_counter()
        status = 500
        try:
            self._auth(request)
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                self.metrics["errors"].inc(tags={"kind": "content_type"})
                raise HTTPError(415, f"content type {kind or 'none'!r}; send application/json")
            body = await read_body(request, self.cfg.limits.max_body_bytes)
            try:
                req = EditRequest.model_validate_json(body)
                check_limits(req, self.cfg.limits)
            except ValidationError as err:
                self.metrics["errors"].inc(tags={"kind": "invalid"})
                raise HTTPError(422, _first_error(err.errors())) from None
            except ValueError as err:
                self.metrics["errors"].inc(tags={"kind": "limit"})
                raise HTTPError(422, str(err)) from None
            units = self.engine.units(req)
            self._admit(units)  # 503 at once when the replica expects to answer too late
            try:
                try:
                    job = await asyncio.to_thread(self.engine.prepare, req)
                except UserError as err:
                    raise self._user_error(err) from None
                job.units = units
                result = await self._edit_batch(job)
            finally:
                if self.admission is not None:
                    self.admission.done(units)
            if isinstance(result, UserError):
                raise self._user_error(result)
            if isinstance(result, Exception):
                raise result
            result, batch = result
            meta = {
                **job.meta,
                "batch": batch,
                "ms": round(1000 * (time.perf_counter() - started), 1),
                "pid": os.getpid(),
                "node": self.node,
            }
            status = 200
            if req.format == "json":
                import base64

                return JSONResponse(
                    EditResponse(image=base64.b64encode(result).decode(), meta=meta).model_dump()
                )
            return Response(result, media_type="image/png", headers={"X-Edit-Meta": json.dumps(meta)})
        except HTTPError as err:
            status = err.status
            raise
        finally:
            self._count("edits", status)
            self.metrics["latency"].observe(time.perf_counter() - started, tags={"route": "edits"})


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    r = cfg.replicas
    options: dict[str, Any] = {
        "max_ongoing_requests": r.max_ongoing_requests,
        # Past this many waiting requests (per caller) Serve answers 503 with Retry-After at once
        # instead of queueing without bound.
        "max_queued_requests": r.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": r.retry_after_s},
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "user_config": {"banks": cfg.banks},
    }
    if r.num_replicas == "auto":
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": r.min_replicas,
            "initial_replicas": max(1, r.min_replicas),
            "max_replicas": r.max_replicas,
            "target_ongoing_requests": r.target_ongoing_requests,
            "upscale_delay_s": r.upscale_delay_s,
            "downscale_delay_s": r.downscale_delay_s,
        }
    else:
        options["num_replicas"] = r.num_replicas
    return options


LOOPBACK = ("127.", "::1", "localhost")


def check_exposure(cfg: ServeConfig, hashes: list[str]) -> None:
    """No keys and a non-loopback address: refused unless the config says allow_anonymous."""
    if hashes:
        return
    if not cfg.host.startswith(LOOPBACK) and not cfg.allow_anonymous:
        raise ConfigError(
            f"serve: host {cfg.host} is reachable from other machines and no API key is set "
            f"(${cfg.api_keys_env} is empty): set keys there, bind 127.0.0.1, or say "
            "allow_anonymous: true in the serve config"
        )
    log.warning("serving without API keys: anyone who reaches %s:%s may edit and label", cfg.host, cfg.port)


def build(cfg: ServeConfig):
    """The bound Serve application for a config."""
    hashes = key_hashes(cfg)
    check_exposure(cfg, hashes)
    return EditServer.options(**deployment_options(cfg)).bind(cfg.model_dump(), hashes)


def build_app(args: dict[str, str]):
    """Application builder for `serve run` / `serve deploy`: args {config: path, ...overrides}."""
    args = dict(args)
    path = args.pop("config", None)
    if path is None:
        raise ValueError("give config=PATH (a serve config such as jobs/serve-shapes.yaml)")
    return build(ServeConfig.from_yaml(path, **args))


def start(cfg: ServeConfig, address: str | None = None, blocking: bool = False):
    """Start (or connect to) Ray, start Serve's HTTP proxy on cfg.host:cfg.port and deploy the
    app; returns the app's base URL. `noiseclr serve` and the tests both start it this way."""
    check_exposure(cfg, key_hashes(cfg))  # refused before Ray and Serve are started for nothing
    # Read by Serve's proxy when it starts: reaches a Ray that this call starts (on a cluster, the
    # nodes' environment holds it)
    os.environ.update(proxy_env(cfg.limits.max_body_bytes))
    init_ray(address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location=cfg.proxy_location, http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=blocking)
    except RuntimeError:
        reason = replica_error(cfg.name)
        if reason is None:  # not the user's doing: Ray's own error, traceback and all
            raise
        serve.delete(cfg.name)  # a failed app left on a shared cluster helps nobody
        raise reason from None
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


USER_ERROR_LINE = re.compile(r"^(noiseclr(?:\.\w+)+)\.(\w+): (.+)$")


def replica_error(app_name: str) -> UserError | None:
    """The user error that kept app `app_name`'s replicas from starting (a bank of another model,
    a missing folder...), as raised in the replica. Serve's own exception says only "Failed to
    update the deployments"; the replica's traceback is in the deployment's status message."""
    import importlib

    app_status = serve.status().applications.get(app_name)
    for deployment in app_status.deployments.values() if app_status else ():
        for line in reversed(deployment.message.splitlines()):
            found = USER_ERROR_LINE.match(line.strip())
            if not found:
                continue
            module, name, text = found.groups()
            try:
                kind = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
            if isinstance(kind, type) and issubclass(kind, UserError):
                return kind(f"the edit server did not start: {text}")
    return None
