"""The Starlette application: OpenAI's chat completions and models, /v1/detect, /v1/segment,
/health and the web page, on one model behind one Batcher.

Every failure is answered as OpenAI answers them, `{"error": {"message", "type", "param",
"code"}}` with its status, and the server goes on serving: 400 (JSON, messages, image, base64),
401 (API key), 404/405, 413 (body), 422 (a setting), 503 (queue full, with Retry-After), 504
(the request's time limit), 500 (anything else, logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import PaliGemmaError
from ..segmentation import parse_segments, segments_json
from .batcher import Batcher, Job, QueueFull
from .config import ServerConfig
from .inputs import ApiError, Work, chat_work, decode_image, task_work

STATIC = Path(__file__).parent / "static"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length"}
DISCONNECT_CHECK_S = 0.5
DRAIN_FACTOR = 16  # an oversized body is read (and dropped) up to this many times the limit, then cut

log = logging.getLogger("mlx_paligemma.server")


def create_app(model, config: ServerConfig) -> Starlette:
    batcher = Batcher(model, config.max_batch, config.batch_wait_s, config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": config.model_name, "backend": model.backend.name,
                             "dtype": model.backend.dtype, "demo": model.is_demo, **batcher.state()})

    async def models(request: Request) -> Response:
        check_key(request, config)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "mlx-paligemma"}]})

    async def chat(request: Request) -> Response:
        check_key(request, config)
        body = await read_json(request, config)
        work = chat_work(body, config, model)
        job = await submit(work)
        if work.stream:
            return StreamingResponse(chat_stream(request, job, work), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out, _ = await finished(request, job)
        return JSONResponse({
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": config.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": FINISH_REASONS.get(out.finished_by, "stop"), "logprobs": None}],
            "usage": usage(out), "system_fingerprint": None,
        })

    async def chat_stream(request: Request, job: Job, work: Work):
        cid, created = completion_id(), int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        deadline = time.monotonic() + config.timeout_s
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await next_event(request, job, deadline)
                if kind == "piece":
                    yield chunk({"content": value})
                    continue
                if kind == "error":
                    yield sse(error_of(value).body())
                    break
                out, _ = value
                yield chunk({}, FINISH_REASONS.get(out.finished_by, "stop"))
                if work.include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": config.model_name, "choices": [], "usage": usage(out)})
                break
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the time limit, once the 200 is sent: the error is the last event
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            # the client went away (the stream was cancelled), or the answer is complete
            job.cancel()

    async def detect(request: Request) -> Response:
        return await task(request, "detect")

    async def segment(request: Request) -> Response:
        return await task(request, "segment")

    async def task(request: Request, name: str) -> Response:
        check_key(request, config)
        body = await read_json(request, config)
        work = task_work(body, config, model, name)
        finish = None
        if name == "segment":
            try:
                import pycocotools.mask  # noqa: F401

                vae = await run_in_threadpool(model.mask_decoder)
            except ImportError:
                raise ApiError(501, "masks as COCO RLE need pycocotools: pip install 'mlx-paligemma[segment]'",
                               "missing_dependency") from None
            except PaliGemmaError as e:
                raise ApiError(501, str(e), "missing_mask_decoder") from None

            def finish(out):
                segments = parse_segments(out.text, out.image_size, vae)
                return {**segments_json(segments), "detections": [box_json(d) for d in segments.detections]}

        job = await submit(work, finish)
        out, extra = await finished(request, job)
        answer = {"id": completion_id(name), "object": name, "created": int(time.time()), "model": config.model_name,
                  "image_size": list(out.image_size), "text": out.text,
                  "finish_reason": FINISH_REASONS.get(out.finished_by, "stop"), "usage": usage(out)}
        if name == "detect":
            answer["detections"] = [box_json(d) for d in out.detections]  # filled by the model for detect prompts
        else:
            answer.update(extra)  # segments (masks as COCO RLE), invalid, detections (boxes without masks)
        return JSONResponse(answer)

    async def submit(work: Work, finish=None) -> Job:
        image = await run_in_threadpool(decode_image, work.image_source, config)
        job = Job(image, work.prompt, work.params, asyncio.get_running_loop(), finish=finish, stream=work.stream)
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); retry later", "queue_full",
                           headers={"Retry-After": str(batcher.retry_after_s())}) from None
        return job

    async def finished(request: Request, job: Job):
        """Wait for the job's end; the client leaving or the time limit cancels it."""
        deadline = time.monotonic() + config.timeout_s
        try:
            while True:
                kind, value = await next_event(request, job, deadline)
                if kind == "done":
                    return value
                if kind == "error":
                    raise error_of(value)
        finally:
            job.cancel()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/detect", detect, methods=["POST"]),
            Route("/v1/segment", segment, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={ApiError: api_error, ClientGone: client_gone, HTTPException: http_error,
                            Exception: server_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return app


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def box_json(d) -> dict:
    return {"label": d.label, "box": [round(float(v), 2) for v in d.box]}


async def next_event(request: Request, job: Job, deadline: float):
    """The job's next event; every half second (events or not) it checks that the client is still there."""
    while True:
        now = time.monotonic()
        if now >= deadline:
            job.cancel()
            raise ApiError(504, "the request took longer than the server's time limit", "timeout")
        if now >= job.next_check:
            job.next_check = now + DISCONNECT_CHECK_S
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone()
        try:
            return await asyncio.wait_for(job.events.get(), timeout=min(DISCONNECT_CHECK_S, deadline - now))
        except asyncio.TimeoutError:
            continue


def check_key(request: Request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", "missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise ApiError(401, "wrong API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: Request, config: ServerConfig) -> dict:
    limit = config.max_body_bytes
    too_big = ApiError(413, f"the request body is over the limit of {limit} bytes", "body_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit * DRAIN_FACTOR:
        raise too_big
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit * DRAIN_FACTOR:
            raise too_big
        if size <= limit:
            body += chunk
    # read to its end, so that the client gets the 413 rather than a broken connection
    if size > limit:
        raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    return data


def error_of(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PaliGemmaError):
        return ApiError(400, str(e), "invalid_request")
    log.error("generation failed", exc_info=e)
    return ApiError(500, f"the generation failed ({type(e).__name__}); the server goes on", "server_error")


def usage(out) -> dict:
    prompt, completion = out.stats.prompt_tokens, len(out.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_id(kind: str = "chatcmpl") -> str:
    return f"{kind}-{secrets.token_hex(12)}"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def api_error(request: Request, e: ApiError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def client_gone(request: Request, e: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def http_error(request: Request, e: HTTPException) -> Response:
    return JSONResponse(ApiError(e.status_code, str(e.detail), None).body(), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


async def server_error(request: Request, e: Exception) -> Response:
    log.error("request failed", exc_info=e)
    return JSONResponse(ApiError(500, f"internal error ({type(e).__name__})", "server_error").body(), status_code=500)
