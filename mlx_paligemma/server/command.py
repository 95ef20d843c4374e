"""`paligemma serve`: load one model, then serve the API and the web page with uvicorn.

    paligemma serve --model google/paligemma2-3b-mix-224 --port 8000 --api-key KEY

The settings are checked and the model is loaded before the server listens; a bad one ends the
command with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os

from ..api import BACKENDS, DTYPES
from ..checkpoint import DEFAULT_MODEL
from ..errors import SettingError
from ..sampling import DEFAULT_MAX_TOKENS
from ..usage import Parser
from .config import ServerConfig

API_KEY_ENV = "PALIGEMMA_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = Parser(prog="paligemma serve", description="Serve an OpenAI-compatible API, /v1/detect, /v1/segment and a web page.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder or repo id (default {DEFAULT_MODEL}; `demo` = a tiny random-weight model)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="mlx, torch or auto (default auto)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the backend's)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter folder")
    p.add_argument("--vae", default=None, metavar="PATH", help="the mask decoder for /v1/segment (default $PALIGEMMA_VAE, else the stored one; the demo model has its own)")
    p.add_argument("--name", default=None, help="the model id clients see (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY", help=f"require `Authorization: Bearer KEY` on /v1 (default ${API_KEY_ENV} when set)")
    p.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs (with --url-timeout and --max-url-bytes)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N", help=f"largest request body (default {d.max_body_bytes}); more gets 413")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, metavar="N", help=f"largest image, width x height (default {d.max_image_pixels}); more gets 400")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N", help=f"most tokens a request may ask for (default {d.max_tokens}); more gets 422")
    g.add_argument("--default-max-tokens", type=int, default=None, metavar="N", help=f"when a request does not say (default {DEFAULT_MAX_TOKENS}, or --max-tokens when lower)")
    g.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N", help=f"requests waiting for a batch (default {d.max_queue}); more get 503 with Retry-After")
    g.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N", help=f"requests generated together (default {d.max_batch})")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_s * 1000, metavar="MS", help=f"how long a request waits for others to join its batch (default {d.batch_wait_s * 1000:g})")
    g.add_argument("--timeout", type=float, default=d.timeout_s, metavar="S", help=f"per request, arrival to last token (default {d.timeout_s:g}); then 504")
    g.add_argument("--url-timeout", type=float, default=d.url_timeout_s, metavar="S", help=f"one image download with --allow-urls (default {d.url_timeout_s:g})")
    g.add_argument("--max-url-bytes", type=int, default=d.max_url_bytes, metavar="N", help=f"one image download with --allow-urls (default {d.max_url_bytes})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn's log level (default info)")
    return p


def config_from(args) -> ServerConfig:
    if args.default_max_tokens is None:
        args.default_max_tokens = min(DEFAULT_MAX_TOKENS, args.max_tokens)
    for name in ("max_body_bytes", "max_image_pixels", "max_tokens", "default_max_tokens", "max_queue", "max_batch", "max_url_bytes"):
        if getattr(args, name) < 1:
            raise SettingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("timeout", "url_timeout"):
        if not getattr(args, name) > 0:
            raise SettingError(f"--{name.replace('_', '-')} must be more than 0 seconds, got {getattr(args, name)}")
    if args.batch_wait_ms < 0:
        raise SettingError(f"--batch-wait-ms must be 0 or more, got {args.batch_wait_ms}")
    if not 0 <= args.port <= 65535:
        raise SettingError(f"--port must be in [0, 65535], got {args.port}")
    if args.default_max_tokens > args.max_tokens:
        raise SettingError(f"--default-max-tokens ({args.default_max_tokens}) is over --max-tokens ({args.max_tokens})")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise SettingError("--api-key must not be empty")
    return ServerConfig(
        model_name=args.name or str(args.model), api_key=key, allow_urls=args.allow_urls,
        max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels, max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens, max_queue=args.max_queue, max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000, timeout_s=args.timeout, url_timeout_s=args.url_timeout,
        max_url_bytes=args.max_url_bytes,
    )


def main(argv: list[str]) -> int:
    """Run the server until Ctrl-C (errors propagate as PaliGemmaError / UsageError to the CLI)."""
    args = build_parser().parse_args(argv)
    config = config_from(args)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise SettingError(f"the server needs its extra ({e.name} is missing): pip install 'mlx-paligemma[serve]'") from None
    from ..api import load

    model = load(args.model, backend=args.backend, dtype=args.dtype, adapter=args.adapter, vae=args.vae)
    app = create_app(model, config)
    note = " (demo checkpoint: random weights, random answers)" if model.is_demo else ""
    print(f"serving {config.model_name}{note} on http://{args.host}:{args.port}/ (API under /v1, Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
