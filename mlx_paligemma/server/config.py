"""The server's settings: where it listens, who may call it, and the limits every request is held to."""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling import DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "paligemma"  # the id /v1/models lists and responses carry
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer <key>`
    allow_urls: bool = False  # fetch http(s) image URLs (else only data URLs and base64)
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000  # a larger image (from its header) is refused before decoding
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # when a request does not say
    max_queue: int = 32  # requests waiting for a batch; one more gets 503 with Retry-After
    max_batch: int = 8  # rows of one generation batch
    batch_wait_s: float = 0.05  # how long the first waiting request waits for others to join it
    timeout_s: float = 600.0  # per request, from arrival to the last token
    url_timeout_s: float = 10.0  # one image download, whole
    max_url_bytes: int = 20 * 1024 * 1024  # one image download
