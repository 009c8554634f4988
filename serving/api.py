"""The HTTP service: the recommender as JSON over HTTP, its metrics, and a demo storefront.

``create_app(settings)`` builds a FastAPI application around one :class:`Recommender` (loaded
in the background until the home has a release, then following its pointers);
``instantrec serve`` runs it under uvicorn, bound to 127.0.0.1 unless told otherwise.

Endpoints: ``POST /recommend``, ``POST /events`` (one event or ``{"events": [...]}``),
``GET /items/{item_id}``, ``GET /sessions/{session_id}``, ``GET /facets``, ``GET /healthz``
(the process is alive), ``GET /readyz`` (a release is loaded, and which), ``GET /metrics``
(Prometheus text format), ``/docs`` (OpenAPI, served without a CDN) and ``/`` (the demo
storefront, plain HTML and JavaScript from ``serving/static``).

Every error is JSON, ``{"error": {"type", "field", "message"}}``: bad input is a 4xx that names
the field (422 for a value, 404 for an unknown item, 409 for an event id already recorded with
another payload, 413 for a body over the limit), the
Python API's own errors (:class:`InvalidInputError` and its kinds) keep their type names, and
user input never causes a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import InvalidInputError
from serving.events import EVENT_TYPES, MAX_ID_CHARS, MAX_POSITION, EventConflictError, EventError
from serving.recommender import MAX_K, Recommendation, Recommender
from serving.retrieval import MAX_PRICE
from serving.schema import ITEM_ID
from serving.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# Latency buckets (seconds): fine around the 1-20 ms a request takes, coarse beyond.
BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.0125, 0.015, 0.020, 0.025,
           0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Price = Annotated[float, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)]


# -- request and response bodies ------------------------------------------------------------

class FiltersIn(BaseModel):
    """Business filters; all optional. Prices are inclusive; ``category`` matches exactly."""

    model_config = ConfigDict(extra="forbid", strict=True)
    category: Id | list[Id] | None = Field(None, description="one category or any of several")
    min_price: Price | None = None
    max_price: Price | None = None
    in_stock: bool | None = None


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"query": "cordless drill", "k": 10, "filters": {"max_price": 150, "in_stock": True},
         "session_id": "s-42"}]})
    query: str | None = Field(None, description="the shopper's words; omit with a session_id "
                              "to recommend from the session's interest alone")
    k: int = Field(10, ge=1, le=MAX_K)
    filters: FiltersIn | None = None
    session_id: Id | None = Field(None, description="the same id in later requests and events "
                                  "makes clicks shape the next results at once")


class RecommendOut(BaseModel):
    release_id: str
    ranker_seq: int = Field(description="ranker checkpoint that scored (0 = untrained)")
    intent_shift: bool = Field(description="this query moved the session off its interest")
    took_ms: float
    results: list[Recommendation] = Field(description="best first, each with the signals "
                                          "its score is made of")


class EventIn(BaseModel):
    """One feedback event. ``user_id`` is hashed (keyed HMAC) before anything is stored."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"type": "click", "session_id": "s-42", "item_id": "SKU-10165", "query": "headphones",
         "position": 3, "event_id": "c-1"}]})
    type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    session_id: Id
    item_id: Id
    event_id: Id | None = Field(None, description="give one so that re-sending is a no-op "
                                "(re-sent with another payload: 409, nothing stored)")
    user_id: Id | None = None
    query: str | None = None
    position: int | None = Field(None, ge=1, le=MAX_POSITION)
    ts: float | None = Field(None, gt=0, allow_inf_nan=False,
                             description="unix seconds; default: when it is received")


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    events: list[EventIn] = Field(min_length=1)


class EventsOut(BaseModel):
    recorded: int = Field(description="newly stored")
    duplicates: int = Field(description="event ids already in the log with the same payload "
                            "(a no-op)")
    event_ids: list[str]


class ItemOut(BaseModel):
    item_id: str
    title: str
    category: str | None
    brand: str | None
    price: float | None
    in_stock: bool


class ErrorBody(BaseModel):
    type: str
    field: str | None
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "invalid input; `field` names it"},
    429: {"model": ErrorOut, "description": "too many requests for one session or user"},
    503: {"model": ErrorOut, "description": "no release loaded yet"},
}
EVENT_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 409: {
    "model": ErrorOut, "description": "an event id already recorded with another payload; "
    "`field` names its `event_id`, and nothing of the request was stored"}}
_EVENTS_BODY: TypeAdapter[EventIn | EventsIn] = TypeAdapter(EventIn | EventsIn)
_ONE_EVENT: TypeAdapter[EventIn] = TypeAdapter(EventIn)
_BATCH: TypeAdapter[EventsIn] = TypeAdapter(EventsIn)


# -- errors ---------------------------------------------------------------------------------

class ServiceError(Exception):
    """An HTTP error with the JSON body every error here has."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.field = status, kind, field


def _error(status: int, kind: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "field": field, "message": message}},
                        status_code=status)


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "filters", "max_price")`` -> ``"filters.max_price"``; list indices as [i]."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("EventIn", "EventsIn"):  # union member tags
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_error(errors: list[Any]) -> ServiceError:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is a character position, not a field
        detail = (first.get("ctx") or {}).get("error", "")
        return ServiceError(422, "InvalidRequest", f"body is not valid JSON: {detail}".rstrip(": "),
                            "body")
    field = _field_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid request"))
    return ServiceError(422, "InvalidRequest", f"{field}: {message}" if field else message, field)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json(payload: Any, status: int = 200) -> Response:
    try:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a non-finite float somewhere
        body = json.dumps(_finite(payload), allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


# -- metrics --------------------------------------------------------------------------------

class _LiveCollector:
    """Scrape-time figures of the live state: release id and age, ranker checkpoint and its
    age, how far the event log is ahead of the checkpoint, and the recommender's counters."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        rec = self.service.recommender
        ready = GaugeMetricFamily("instantrec_ready", "1 when a release is loaded")
        ready.add_metric([], 1.0 if rec is not None else 0.0)
        yield ready
        if rec is None:
            return
        manifest = rec.manifest
        info = GaugeMetricFamily("instantrec_release_info", "the release being served",
                                 labels=["release_id"])
        info.add_metric([rec.release_id], 1.0)
        yield info
        items = GaugeMetricFamily("instantrec_release_items", "items in the live release")
        items.add_metric([], float(manifest.item_count))
        yield items
        age = GaugeMetricFamily("instantrec_release_age_seconds",
                                "seconds since the live release was built")
        try:
            age.add_metric([], max(0.0, time.time() - datetime.fromisoformat(
                manifest.created_at).timestamp()))
            yield age
        except ValueError:
            pass
        seq = GaugeMetricFamily("instantrec_ranker_checkpoint_seq",
                                "ranker checkpoint in use (0 = untrained)")
        seq.add_metric([], float(rec.ranker_seq))
        yield seq
        yield from self._checkpoint(rec)
        counters = CounterMetricFamily("instantrec_recommender", "what the recommender counted "
                                       "(requests, rejections by kind, events, reloads)",
                                       labels=["name"])
        for name, value in sorted(rec.counters.items()):
            counters.add_metric([name], float(value))
        yield counters

    def _checkpoint(self, rec: Recommender) -> Any:
        from serving.checkpoint import read_latest
        from serving.layout import rankers_dir

        home = rec.home
        if home is None:
            return
        try:
            ref = read_latest(home)
            end = rec.event_log.last_offset()
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.warning("metrics: checkpoint or event log unreadable: %s", exc)
            return
        lag = GaugeMetricFamily("instantrec_event_log_lag_events",
                                "events in the log not yet in the live ranker checkpoint")
        lag.add_metric([], float(max(0, end - (ref.offset if ref is not None else 0))))
        yield lag
        if ref is not None:
            try:
                mtime = (rankers_dir(home) / ref.file).stat().st_mtime
            except OSError:
                return
            age = GaugeMetricFamily("instantrec_ranker_checkpoint_age_seconds",
                                    "seconds since the live ranker checkpoint was written")
            age.add_metric([], max(0.0, time.time() - mtime))
            yield age


class _Instrument:
    """Pure ASGI middleware: request counts and latency per endpoint (the route's template,
    so item ids do not each make a series), and the body size limit."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        limit = self.service.settings.http_max_body_bytes

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"),
                          None)
            if length is not None and (not length.isdigit() or int(length) > limit):
                self.service.errors.labels("BodyTooLarge").inc()
                await _error(413, "BodyTooLarge", f"request body over {limit} bytes (the "
                             "http_max_body_bytes setting)", "body")(scope, receive, send_status)
            else:
                await self.app(scope, _capped(receive, limit), send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.service.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.service.latency.labels(endpoint).observe(time.perf_counter() - start)


class BodyTooLarge(Exception):
    pass


def _capped(receive: Any, limit: int) -> Any:
    """``receive`` that stops a streamed (chunked) body past ``limit`` bytes."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
        return message

    return wrapped


# -- rate limits ----------------------------------------------------------------------------

class RateLimiter:
    """Token buckets per key (a session, a user): ``rate`` requests a second on average,
    ``burst`` at once. A flood from one key is refused (429) without slowing anyone else.
    Bounded: the least recently seen keys are forgotten past ``max_keys``. Keys are hashed
    with a per-process salt, so no raw user id is held."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._salt = os.urandom(16)
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> float:
        """0.0 if a request for ``key`` may go ahead now (and count it), else the seconds
        until it may."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), key=self._salt,
                                 digest_size=16).digest()
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(digest, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[digest] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


def _limit(limiter: RateLimiter, keys: list[tuple[str, str]], service: Service) -> None:
    """Raise a 429 naming the field whose key is over its rate."""
    for field, key in keys:
        wait = limiter.allow(key)
        if wait > 0:
            service.errors.labels("RateLimited").inc()
            raise ServiceError(429, "RateLimited", f"too many requests for this {field}; "
                               f"retry in {wait:.2f} s", field)


# -- the service ----------------------------------------------------------------------------

class Service:
    """The recommender behind the app: loaded in the background until the home has a live
    release (``/readyz`` says why not meanwhile), then following its pointers."""

    def __init__(self, settings: Settings, recommender: Recommender | None = None) -> None:
        self.settings = settings
        self.recommender = recommender
        self.not_ready = "loading" if recommender is None else ""
        self.registry = CollectorRegistry()
        self.requests = PromCounter("instantrec_http_requests", "HTTP requests",
                                    ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("instantrec_http_request_duration_seconds",
                                 "HTTP request latency, in the server", ["endpoint"],
                                 buckets=BUCKETS, registry=self.registry)
        self.errors = PromCounter("instantrec_http_errors", "error responses by kind",
                                  ["kind"], registry=self.registry)
        self.registry.register(_LiveCollector(self))
        self._stop = threading.Event()
        self._loader: threading.Thread | None = None
        self._owns_recommender = recommender is None  # closed on shutdown only if ours
        self.recommend_limit = RateLimiter(settings.http_rate_recommend, 2 * settings.
                                           http_rate_recommend)
        self.events_limit = RateLimiter(settings.http_rate_events, 2 * settings.http_rate_events)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Where requests run, off the event loop: the encoder, Annoy and numpy release the
        GIL, so requests overlap on the cores (a plain executor: its hand-off costs less than
        the framework's default thread pool's). Made on first use, again after a shutdown."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.settings.http_threads,
                                                    thread_name_prefix="instantrec-request")
            return self._executor

    def start(self) -> None:
        if self.recommender is None and self._loader is None:
            self._loader = threading.Thread(target=self._load, name="instantrec-load",
                                            daemon=True)
            self._loader.start()

    def _load(self) -> None:
        while not self._stop.is_set():
            try:
                self.recommender = Recommender.load(settings=self.settings)
                self.not_ready = ""
                return
            except Exception as exc:  # noqa: BLE001 - keep trying; /readyz reports it
                reason = f"{type(exc).__name__}: {exc}"
                if reason != self.not_ready:
                    log.warning("not ready: %s (retrying every %.1f s)", reason,
                                self.settings.reload_interval_s)
                self.not_ready = reason
            self._stop.wait(self.settings.reload_interval_s)

    def ready(self) -> Recommender:
        rec = self.recommender
        if rec is None:
            raise ServiceError(503, "NotReady", f"no release loaded yet ({self.not_ready})")
        return rec

    def close(self) -> None:
        self._stop.set()
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
        if self._owns_recommender and self.recommender is not None:
            self.recommender.close()


def create_app(settings: Settings | None = None, recommender: Recommender | None = None,
               ) -> FastAPI:
    """The application. Without ``recommender`` it loads the live release of
    ``settings.home`` in the background when the app starts (see :class:`Service`)."""
    from contextlib import asynccontextmanager

    from fastapi_offline import FastAPIOffline

    service = Service(settings or Settings(), recommender)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        service.start()
        yield
        service.close()

    app = FastAPIOffline(
        title="instantrec", version="1", lifespan=lifespan,
        description="Real-time search recommendations: ask with `POST /recommend`, report "
                    "what the shopper did with `POST /events`, and the same session's next "
                    "results change at once.")
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        service.errors.labels(exc.kind).inc()
        return _error(exc.status, exc.kind, str(exc), exc.field)

    @app.exception_handler(InvalidInputError)
    async def invalid_input(_: Request, exc: InvalidInputError) -> JSONResponse:
        kind = type(exc).__name__
        service.errors.labels(kind).inc()
        return _error(422, kind, str(exc), exc.field)

    @app.exception_handler(EventConflictError)
    async def event_conflict(_: Request, exc: EventConflictError) -> JSONResponse:
        service.errors.labels("EventConflictError").inc()
        return _error(409, "EventConflictError", str(exc), exc.field)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(list(exc.errors()))
        service.errors.labels(err.kind).inc()
        return _error(422, err.kind, str(err), err.field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        service.errors.labels(kind).inc()
        return _error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        service.errors.labels("BodyTooLarge").inc()
        return _error(413, "BodyTooLarge", str(exc), "body")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error %s", ref)
        service.errors.labels("InternalError").inc()
        return _error(500, "InternalError", f"internal error (logged as {ref})")

    app.add_middleware(_Instrument, service=service)

    @app.post("/recommend", response_model=RecommendOut, responses=ERRORS,
              summary="Top k items for a query, a session, or both")
    async def recommend(body: RecommendIn) -> Response:
        rec = service.ready()
        if body.session_id is not None:
            _limit(service.recommend_limit, [("session_id", f"s:{body.session_id}")], service)
        filters = body.filters.model_dump(exclude_none=True) if body.filters is not None else None

        def call() -> Response:
            start = time.perf_counter()
            info: dict[str, Any] = {}
            results = rec.recommend(body.query, k=body.k, filters=filters,
                                    session_id=body.session_id, info=info)
            return _json({"release_id": info["release_id"], "ranker_seq": info["ranker_seq"],
                          "intent_shift": info["intent_shift"],
                          "took_ms": round((time.perf_counter() - start) * 1000, 3),
                          "results": [r.to_dict() for r in results]})

        return await asyncio.get_running_loop().run_in_executor(service.executor, call)

    @app.post("/events", response_model=EventsOut, responses=EVENT_ERRORS,
              summary="Record one event, or a batch as {\"events\": [...]}",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": _EVENTS_BODY.json_schema(
                      ref_template="#/components/schemas/{model}")}}}})
    async def events(request: Request) -> Response:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ServiceError(422, "InvalidRequest", f"body is not JSON: {exc}", "body") from None
        batch = isinstance(data, dict) and "events" in data
        try:
            parsed = _BATCH.validate_python(data) if batch else _ONE_EVENT.validate_python(data)
        except ValidationError as exc:
            raise _validation_error(list(exc.errors())) from None
        items = parsed.events if isinstance(parsed, EventsIn) else [parsed]
        limit = service.settings.http_max_events
        if len(items) > limit:
            raise ServiceError(413, "TooManyEvents", f"{len(items)} events in one request; "
                               f"the limit is {limit} (the http_max_events setting)", "events")
        rec = service.ready()
        keys = {("session_id", f"s:{e.session_id}") for e in items} | {
            ("user_id", f"u:{e.user_id}") for e in items if e.user_id is not None}
        _limit(service.events_limit, sorted(keys), service)
        raws = [e.model_dump(exclude_none=True) for e in items]
        try:  # on the request threads, as /recommend: the durable append waits on the disk
            stored, result = await asyncio.get_running_loop().run_in_executor(
                service.executor, rec.record_batch, raws)
        except EventError as exc:
            if batch and exc.field and not exc.field.startswith("events"):
                exc.field = f"events[0].{exc.field}"
            raise
        return _json({"recorded": result.accepted, "duplicates": result.duplicates,
                      "event_ids": [e.event_id for e in stored]})

    @app.get("/items/{item_id}", response_model=ItemOut,
             responses={404: {"model": ErrorOut}, 503: ERRORS[503]},
             summary="One item of the live release")
    def item(item_id: str) -> Response:
        found = service.ready().item(item_id)
        if found is None:
            raise ServiceError(404, "NotFound", f"item {item_id[:MAX_ID_CHARS]!r} is not in "
                               "the live release", ITEM_ID)
        return _json(found)

    @app.get("/sessions/{session_id}", responses=ERRORS,
             summary="What shapes a session's next results (its interest, any intent shift)")
    def session(session_id: str) -> Response:
        return _json(service.ready().session_summary(session_id))

    @app.get("/facets", responses={503: ERRORS[503]},
             summary="Categories (with item counts) and the price range of the live release")
    def facets() -> Response:
        rec = service.ready()
        prices = rec.bundle.items.prices
        known = prices[prices == prices]
        return _json({"release_id": rec.release_id, "categories": rec.categories(),
                      "price": {"min": float(known.min()), "max": float(known.max())}
                      if len(known) else None})

    @app.get("/healthz", summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: ERRORS[503]},
             summary="Ready when a release is loaded; names it")
    def readyz() -> Response:
        rec = service.recommender
        if rec is None:
            raise ServiceError(503, "NotReady", f"no release loaded yet ({service.not_ready})")
        # files of the live release changed in place: still 200 (it serves what it loaded;
        # every replica sharing the files out of rotation at once would be an outage), but
        # said, for an operator (and counted in /metrics: release_files_changed)
        changed = rec.changed_files
        return _json({"status": "degraded" if changed else "ready",
                      "release_id": rec.release_id, "items": rec.manifest.item_count,
                      "ranker_seq": rec.ranker_seq, "release_files_changed": changed})

    @app.get("/metrics", summary="Prometheus text format", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    page = (STATIC_DIR / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def storefront() -> HTMLResponse:
        return HTMLResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def app_from_env() -> FastAPI:
    """The application with settings from the environment: the factory for servers that
    import the app by name in their own worker processes (granian)."""
    from serving.settings import load_settings

    return create_app(load_settings())


SERVERS = ("uvicorn", "granian")


def serve(settings: Settings, log_level: str = "info", server: str = "uvicorn") -> None:
    """Run the service on ``settings.http_host``:``settings.http_port`` under uvicorn (one
    process, uvloop and httptools where installed) or granian (a Rust HTTP server; its worker
    process builds the app from the environment, so the settings travel there)."""
    if server == "uvicorn":
        import uvicorn

        uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port,
                    log_level=log_level, access_log=False, server_header=False)
    elif server == "granian":
        from granian.constants import Interfaces
        from granian.server import Server

        os.environ["INSTANTREC_HOME"] = str(settings.home)
        if settings.encoder_path is not None:
            os.environ["INSTANTREC_ENCODER_PATH"] = str(settings.encoder_path)
        Server("serving.api:app_from_env", address=settings.http_host, port=settings.http_port,
               interface=Interfaces.ASGI, factory=True, log_access=False).serve()
    else:
        raise ValueError(f"unknown server {server!r} (one of {', '.join(SERVERS)})")
