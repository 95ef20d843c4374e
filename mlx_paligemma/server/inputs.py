"""Request bodies -> checked work: the image, the prompt and the SamplingParams of one generation.

Everything a client can get wrong is found here, before the request joins a batch, and raised as
an ApiError carrying the HTTP status and the OpenAI-style error body. Statuses: 400 for a body
that is not what the endpoint reads (JSON, messages, images, base64), 422 for a setting out of
its range, 413 for a body over the limit.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field

from ..errors import ImageError, PromptError, SettingError
from ..image import load_image
from ..prompts import detect_things, task_prompt
from ..sampling import SamplingParams
from .config import ServerConfig

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_TEMPERATURE = 2.0  # as OpenAI's API


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
             500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Work:
    """One generation a request asks for, checked; `image_source` is decoded by `decode_image`."""

    prompt: str
    params: SamplingParams
    image_source: str
    task: str = "chat"  # chat, detect or segment
    stream: bool = False
    include_usage: bool = False
    extra: dict = field(default_factory=dict)


def setting_error(e: SettingError, param: str | None = None) -> ApiError:
    return ApiError(422, str(e), code="invalid_setting", param=param)


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False, default=None):
    if name not in body or body[name] is None:
        return default
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < low or v > high or (low_open and v == low):
        edge = "(" if low_open else "["
        raise ApiError(422, f"{name} must be a number in {edge}{low:g}, {high:g}], got {v!r}", "invalid_setting", name)
    return v


def _whole(body: dict, name: str, low: int, high: int | None = None, default=None):
    if name not in body or body[name] is None:
        return default
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(422, f"{name} must be a whole number {span}, got {v!r}", "invalid_setting", name)
    return v


def sampling(body: dict, config: ServerConfig, model, constrain: bool = False) -> SamplingParams:
    """OpenAI's settings (and top_k, repetition_penalty) -> SamplingParams checked for the model.

    constrain: hold a detect/segment answer to the objects' grammar (see grammar)."""
    n = _whole(body, "n", 1, 1, default=1)
    if n != 1:
        raise ApiError(422, "n must be 1", "invalid_setting", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(422, f"{name} is not supported (use repetition_penalty)", "invalid_setting", name)
    if body.get("logprobs"):
        raise ApiError(422, "logprobs are not supported", "invalid_setting", "logprobs")
    limit = min(config.max_tokens, model.context_len)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _whole(body, name, 1, limit, default=min(config.default_max_tokens, limit))
    settings = dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, MAX_TEMPERATURE, default=0.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True, default=1.0),
        top_k=_whole(body, "top_k", 0, default=0),
        seed=_whole(body, "seed", 0, 2**63 - 1, default=0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 100.0, low_open=True, default=1.0),
        stop=_stop(body.get("stop")),
        constrain=constrain,
    )
    try:
        return model.sampling(**settings)
    except SettingError as e:
        raise setting_error(e) from None


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > MAX_STOP_STRINGS:
        raise ApiError(422, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       "invalid_setting", "stop")
    return tuple(value)


def chat_work(body: dict, config: ServerConfig, model) -> Work:
    """A chat completion: the text of the last user message is the prompt, its image the image.

    PaliGemma is not a chat model: it answers one prompt about one image. An image may come in an
    earlier user message (the latest one counts); system and assistant messages are not used.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_messages", "messages")
    image, prompt = None, None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}] must be an object with a role (system, user, assistant)",
                           "invalid_messages", f"messages[{i}]")
        if message["role"] != "user":
            continue
        texts, images = _parts(message.get("content"), i)
        if len(images) > 1:
            raise ApiError(400, f"messages[{i}] has {len(images)} images; PaliGemma takes one image per request",
                           "too_many_images", f"messages[{i}].content")
        image = images[0] if images else image
        prompt = " ".join(t.strip() for t in texts if t.strip())
    if prompt is None:
        raise ApiError(400, "messages has no user message", "invalid_messages", "messages")
    if image is None:
        raise ApiError(400, "PaliGemma answers about an image: send one as an image_url part of a user message",
                       "missing_image", "messages")
    if not prompt:
        raise ApiError(400, "the last user message has no text: send the prompt as a text part (e.g. \"caption en\")",
                       "missing_prompt", "messages")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(422, "stream_options must be an object", "invalid_setting", "stream_options")
    work = Work(prompt, sampling(body, config, model), image, "chat", stream,
                include_usage=bool(options and options.get("include_usage")))
    check_prompt(model, prompt)
    return work


def _flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(422, f"{name} must be true or false, got {v!r}", "invalid_setting", name)
    return v


def _parts(content, i: int) -> tuple[list[str], list[str]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "invalid_messages",
                       f"messages[{i}].content")
    texts, images = [], []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{where}: image_url needs a url (a data URL, or http(s) with --allow-urls)",
                               "invalid_image", where)
            images.append(url)
        else:
            raise ApiError(400, f"{where}: parts are {{\"type\": \"text\", \"text\": ...}} or "
                           "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}", "invalid_messages", where)
    return texts, images


def task_work(body: dict, config: ServerConfig, model, task: str) -> Work:
    """/v1/detect and /v1/segment: {"image": data URL, URL or base64, "objects": [...] or "a ; b", settings,
    "constrain": true (the default)}."""
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise ApiError(400, "image must be a data URL, base64 text, or an http(s) URL (with --allow-urls)",
                       "missing_image", "image")
    objects = body.get("objects")
    if isinstance(objects, list) and all(isinstance(o, str) for o in objects):
        objects = " ; ".join(objects)
    if not isinstance(objects, str):
        raise ApiError(400, 'objects must be a list of names or one string, like ["car", "person"] or "car ; person"',
                       "invalid_objects", "objects")
    try:
        prompt = task_prompt(task, detect_things(objects, task))
    except SettingError as e:
        raise ApiError(400, str(e), "invalid_objects", "objects") from None
    # well-formed objects by default (even from a random or quantized model); "constrain": false lets the answer run free
    constrain = _flag(body, "constrain", default=True)
    work = Work(prompt, sampling(body, config, model, constrain), image, task)
    check_prompt(model, prompt)
    return work


def check_prompt(model, prompt: str) -> None:
    try:
        model.prompt_ids(prompt)
    except PromptError as e:
        raise ApiError(400, str(e), "context_length_exceeded", "messages") from None


def decode_image(source: str, config: ServerConfig):
    """A data URL, bare base64 or (with allow_urls) an http(s) URL -> an RGB PIL image, or ApiError 400.

    Blocking (decoding, downloading): call it in a worker thread.
    """
    try:
        if source.startswith(("http://", "https://")):
            if not config.allow_urls:
                raise ApiError(400, "image URLs are not fetched by this server (start it with --allow-urls); "
                               "send the image as a data URL", "url_not_allowed", "image_url")
            return load_image(source, allow_urls=True, max_pixels=config.max_image_pixels,
                              url_timeout_s=config.url_timeout_s, max_url_bytes=config.max_url_bytes)
        if source.startswith("data:"):
            header, comma, data = source.partition(",")
            if not comma or not header.endswith(";base64"):
                raise ApiError(400, "a data URL must be data:<type>;base64,<data>", "invalid_image", "image_url")
        elif ":" in source[:12]:
            raise ApiError(400, f"image URLs must be data: (or http(s) with --allow-urls), got {source[:12]!r}...",
                           "invalid_image", "image_url")
        else:
            data = source
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image is not valid base64", "invalid_base64", "image_url") from None
        return load_image(raw, max_pixels=config.max_image_pixels)
    except ImageError as e:
        raise ApiError(400, str(e), "invalid_image", "image_url") from None
