"""The `paligemma` command: one task on one image, or the interactive shell.

    paligemma caption cat.jpg
    paligemma answer cat.jpg what colour is the cat?
    paligemma detect street.jpg "car ; person" --save boxes.jpg
    paligemma -i cat.jpg -p "caption es" --json
    paligemma chat --image cat.jpg
    paligemma convert google/paligemma2-3b-mix-224 pg2-3b-4bit --quantize 4

Everything goes through the public API. Settings and the image are checked before the model
loads; any PaliGemmaError ends the run with one `error: ...` line on stderr and exit code 2,
Ctrl-C with exit code 130. The answer goes to stdout, notes and the stats line to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .api import BACKENDS, DTYPES, pick_backend
from .batch import BATCH_TASKS, DEFAULT_BATCH_SIZE, need_pycocotools
from .checkpoint import DEFAULT_MODEL
from .demo import DEMO_NOTE
from .errors import OutputError, PaliGemmaError, SettingError
from .prompts import is_detection_prompt, is_segmentation_prompt, task_prompt
from .sampling import DEFAULT_MAX_TOKENS, SamplingParams
from .shell import Settings, run_shell
from .usage import Parser, UsageError

DETAIL_MAX_TOKENS = 512
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what save_image_atomic writes
TASKS = ("describe", "caption", "ocr", "answer", "detect", "segment")


def _shared(p: argparse.ArgumentParser, top: bool) -> None:
    """Options every command takes, before or after the command's name.

    Subcommands get them with SUPPRESS defaults so a value given before the command survives.
    """
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", default=d(DEFAULT_MODEL), help=f"checkpoint folder or repo id (default {DEFAULT_MODEL}; `demo` = a tiny random-weight model)")
    g.add_argument("--backend", choices=BACKENDS, default=d("auto"), help="mlx, torch or auto (default auto: mlx on Apple silicon, torch elsewhere)")
    g.add_argument("--dtype", choices=DTYPES, default=d(None), help="compute dtype (default: the backend's)")
    g.add_argument("--adapter", default=d(None), metavar="DIR", help="a LoRA adapter folder (PEFT's layout, e.g. from paligemma finetune)")
    g.add_argument("--max-tokens", type=int, default=d(None), metavar="N", help=f"most tokens in the answer (default {DEFAULT_MAX_TOKENS})")
    g.add_argument("--temperature", type=float, default=d(0.0), metavar="T", help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=d(1.0), metavar="P", help="nucleus sampling mass in (0, 1] (default 1)")
    g.add_argument("--top-k", type=int, default=d(0), metavar="K", help="sample among the K most likely tokens (default 0: no limit)")
    g.add_argument("--seed", type=int, default=d(0), help="seed of the sampler (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=d(1.0), metavar="P",
                   help="> 1 makes ids already in the prompt or answer less likely (default 1: none)")
    g.add_argument("--stop", action="append", default=d(None), metavar="TEXT",
                   help="end the answer at this text, which is left out (repeat for several)")
    g.add_argument("--lang", default=d("en"), help="language code of describe, caption and answer (default en)")
    t = p.add_argument_group("detect and segment")
    t.add_argument("--vae", default=d(None), metavar="PATH", help="big_vision's mask decoder for segment (vae-oid.npz or its .safetensors copy; default $PALIGEMMA_VAE, else the one `paligemma download-vae` stored)")
    t.add_argument("--no-constrain", dest="constrain", action="store_false", default=d(True), help="let detect/segment answers run free (default: held to the objects' grammar: boxes, codes, labels)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", default=d(False), help="print one JSON object with the answer, boxes and stats")
    o.add_argument("--quiet", "-q", action="store_true", default=d(False), help="print only the answer text")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="paligemma",
        description="Ask PaliGemma about an image. With no command, start the interactive shell.",
        epilog="Free prompt: paligemma -i IMAGE -p PROMPT. Exit codes: 0 done, 2 bad input or setting, 130 interrupted.",
    )
    parser.add_argument("-i", "--image", dest="free_image", metavar="IMAGE", help="image for a free prompt (with -p)")
    parser.add_argument("-p", "--prompt", dest="free_prompt", metavar="PROMPT", help="any prompt, sent as is (with -i)")
    _shared(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _shared(p, top=False)
        return p

    p = command("describe", "describe the image (prompt `describe en`)")
    p.add_argument("image", help="image file")
    p.add_argument("--detail", action="store_true", help=f"allow a longer answer ({DETAIL_MAX_TOKENS} tokens)")
    command("caption", "a short caption (prompt `caption en`)").add_argument("image", help="image file")
    command("ocr", "read the text in the image (prompt `ocr`)").add_argument("image", help="image file")
    p = command("answer", "answer a question about the image (prompt `answer en QUESTION`)")
    p.add_argument("image", help="image file")
    p.add_argument("question", nargs="+", help="the question (quotes optional)")
    p = command("detect", "boxes around things (prompt `detect car ; person`)")
    p.add_argument("image", help="image file")
    p.add_argument("things", nargs="+", help='what to look for, separated by ";", e.g. "car ; person"')
    p.add_argument("--save", metavar="OUT", help="write the image with the boxes drawn (.jpg, .png or .webp)")
    p = command("segment", "masks of things (prompt `segment cat ; dog`)")
    p.add_argument("image", help="image file")
    p.add_argument("things", nargs="+", help='what to segment, separated by ";", e.g. "cat ; dog"')
    p.add_argument("--save", metavar="OUT", help="write the image with the masks drawn (.jpg, .png or .webp)")
    p = command("batch", "run a task over many images: a folder, a glob or a JSONL/CSV manifest")
    p.add_argument("input", help="a folder (searched recursively), a quoted glob, or a .jsonl/.csv manifest with an `image` column")
    p.add_argument("--task", required=True, choices=BATCH_TASKS, help="the task prompt of every row (`prompt`: --prompt sent as is)")
    p.add_argument("--prompt", help="the task's argument: the question of answer, the things of detect/segment (a manifest's `prompt` column overrides it)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="results.jsonl or results.parquet; an existing one is resumed")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N", help=f"images per generate_batch call (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (torch backend, one model per actor)")
    p.add_argument("--address", help="the Ray cluster to join (default: start a local one)")
    p.add_argument("--ray-actors", type=int, default=1, metavar="N", help="model actors in the Ray pipeline (default 1)")
    p.add_argument("--ray-cpus", type=float, default=1, metavar="N", help="CPUs each model actor reserves (its torch threads; default 1)")
    p = command("video", "run a task on frames sampled from a video clip (needs PyAV)")
    p.add_argument("clip", help="a video file (anything FFmpeg reads)")
    p.add_argument("--task", required=True, choices=BATCH_TASKS, help="the task prompt of every frame")
    p.add_argument("--prompt", help="the task's argument: the things of detect, the question of answer")
    p.add_argument("--every", default="1s", help="sample a frame every 1s, 0.5s, 250ms, or every Nth frame: 10f (default 1s)")
    p.add_argument("-o", "--output", metavar="OUT", help="frames.jsonl, one row per sampled frame (resumed like batch); default stdout")
    p.add_argument("--save", metavar="VIDEO", help="write the clip with the boxes drawn (.mp4, .mkv, .mov, .webm, .avi)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N", help=f"frames per generate_batch call (default {DEFAULT_BATCH_SIZE})")
    p = command("chat", "the interactive shell")
    p.add_argument("--image", dest="image", help="start with this image")
    sub.add_parser("convert", help="convert a checkpoint to an MLX folder (see paligemma convert --help)", add_help=False)
    sub.add_parser("bench", help="measure speed (see paligemma bench --help)", add_help=False)
    sub.add_parser("download-vae", help="fetch big_vision's mask decoder for segment (see paligemma download-vae --help)", add_help=False)
    sub.add_parser("convert-vae", help="copy a mask decoder file to safetensors (see paligemma convert-vae --help)", add_help=False)
    sub.add_parser("finetune", help="train a LoRA adapter on a JSONL of examples (see paligemma finetune --help)", add_help=False)
    sub.add_parser("merge", help="merge a LoRA adapter into a plain checkpoint folder (see paligemma merge --help)", add_help=False)
    sub.add_parser("serve", help="serve an OpenAI-compatible API and a web page (see paligemma serve --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "convert":
            from .convert import main as convert_main

            return convert_main(argv[1:])
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        if argv and argv[0] in ("download-vae", "convert-vae"):
            return _vae_command(argv[0], argv[1:])
        if argv and argv[0] in ("finetune", "merge"):
            from . import finetune

            return (finetune.main if argv[0] == "finetune" else finetune.merge_main)(argv[1:])
        if argv and argv[0] == "serve":
            from .server.command import main as serve_main

            return serve_main(argv[1:])
        return _run(build_parser().parse_args(argv))
    except UsageError as e:
        return _fail(f"{e} (see paligemma --help)")
    except PaliGemmaError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _bench(argv: list[str]) -> int:
    try:
        from .dev.bench import main as bench_main
    except ModuleNotFoundError as e:
        if e.name not in (f"{__package__}.dev", f"{__package__}.dev.bench"):
            raise
        return _fail("paligemma bench is not part of this version")
    return bench_main(argv)


def _settings(args, image: str | None) -> Settings:
    max_tokens = args.max_tokens
    if max_tokens is None:
        max_tokens = DETAIL_MAX_TOKENS if getattr(args, "detail", False) else DEFAULT_MAX_TOKENS
    lang = args.lang.strip()
    if not lang or " " in lang:
        raise SettingError(f"--lang must be a language code like en or fr, got {args.lang!r}")
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=max_tokens,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop or ()), constrain=args.constrain,
    )
    return Settings(
        model=args.model, backend=args.backend, dtype=args.dtype, adapter=args.adapter, image=image, lang=lang,
        sampling=sampling,
        vae=args.vae,
    ).validate()


def _run(args) -> int:
    command = args.command
    if command in ("convert", "bench", "download-vae", "convert-vae", "finetune", "merge", "serve"):  # only reached when options come before the name
        raise UsageError(f"put `{command}` first: paligemma {command} ...")
    free = args.free_image is not None or args.free_prompt is not None
    if free and command not in (None, "chat"):
        raise UsageError(f"-i/-p are for a free prompt; they do not go with `{command}`")
    if command == "chat" or (command is None and not free):
        if command is None and not sys.stdin.isatty():
            raise UsageError("no command given; use one of describe, caption, ocr, answer, detect, segment, chat, or -i IMAGE -p PROMPT")
        settings = _settings(args, getattr(args, "image", None) or args.free_image)
        return run_shell(lambda: _load(settings), settings)
    if command in ("batch", "video"):
        from .batch_command import run_command as batch_command
        from .video import run_command as video_command

        settings = _settings(args, None)
        return (batch_command if command == "batch" else video_command)(args, settings, lambda: _load(settings))
    if command is None:
        if args.free_image is None or args.free_prompt is None:
            raise UsageError("a free prompt needs both -i IMAGE and -p PROMPT")
        image, prompt = args.free_image, args.free_prompt
        if not prompt.strip():
            raise SettingError("the prompt is empty")
    else:
        image = args.image
        if command == "answer":
            prompt = task_prompt("answer", " ".join(args.question), args.lang.strip())
        elif command in ("detect", "segment"):
            prompt = task_prompt(command, " ".join(args.things))
        else:
            prompt = task_prompt(command, lang=args.lang.strip())
    return run_once(args, _settings(args, image), prompt, getattr(args, "save", None))


def _load(settings: Settings):
    from . import api

    try:
        return api.load(settings.model, backend=settings.backend, dtype=settings.dtype, vae=settings.vae, adapter=settings.adapter)
    except ImportError as e:
        # a backend whose framework is not installed here
        raise SettingError(f"the {pick_backend(settings.backend)} backend cannot start: {e}") from None


def _check_output(path: str) -> Path:
    """Fail before the model runs, not after, when the picture could not be written."""
    out = Path(os.path.expanduser(path))
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputError(f"{out}: unknown image suffix {out.suffix!r}, use .jpg, .jpeg, .png or .webp")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist")
    return out


def run_once(args, settings: Settings, prompt: str, save: str | None) -> int:
    from .detection import draw_detections, format_detections
    from .image import load_image, save_image_atomic
    from .segmentation import draw_segments, format_segments, parse_segments, segments_json

    out_path = _check_output(save) if save else None
    segmenting = is_segmentation_prompt(prompt)
    if segmenting and args.json:
        need_pycocotools()
    picture = load_image(settings.image)
    model = _load(settings)
    vae = model.mask_decoder() if segmenting else None  # a missing decoder: an error before generating
    params = settings.sampling
    model.check(prompt, params)  # a setting or prompt this model cannot take: one error line, nothing else
    if model.is_demo:
        print(DEMO_NOTE, file=sys.stderr)
    elif vae is not None and vae.demo:
        print(f"note: {vae.source} is the demo mask decoder (random weights): its masks mean nothing", file=sys.stderr)
    if args.json:
        result = model.generate(picture, prompt, params)
    else:
        for piece in model.stream(picture, prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = model.last
        sys.stdout.write("\n")
        sys.stdout.flush()
    segments = parse_segments(result.text, result.image_size, vae) if segmenting else None
    detections = segments.detections if segmenting else result.detections
    saved = None
    if out_path is not None:
        drawn = draw_segments(picture, segments, detections) if segmenting else draw_detections(picture, detections)
        saved = save_image_atomic(drawn, out_path)
    if args.json:
        print(json.dumps({
            "model": settings.model,
            "backend": result.stats.backend,
            "demo": model.is_demo,
            "prompt": prompt,
            "image": settings.image,
            "image_size": list(result.image_size),
            "text": result.text,
            "token_ids": result.token_ids,
            "finished_by": result.finished_by,
            "detections": [{"label": d.label, "box": [round(v, 1) for v in d.box]} for d in detections],
            **(dict(segments_json(segments), vae=vae.source, vae_demo=vae.demo) if segmenting else {}),
            "saved": str(saved) if saved else None,
            "stats": result.stats.to_dict(),
        }, ensure_ascii=False))
        return 0
    if args.quiet:
        return 0
    if segmenting:
        if segments:
            print(format_segments(segments))
        if detections:
            print(format_detections(detections))
        if not segments and not detections:
            print("(no masks in the answer)", file=sys.stderr)
        if segments.invalid:
            print(f"({segments.invalid} malformed object(s) in the answer skipped)", file=sys.stderr)
    elif is_detection_prompt(prompt):
        if detections:
            print(format_detections(detections))
        else:
            print("(no boxes in the answer)", file=sys.stderr)
    if saved:
        print(f"saved {saved}", file=sys.stderr)
    print(result.stats.line(), file=sys.stderr)
    return 0


def _vae_command(name: str, argv: list[str]) -> int:
    """`paligemma download-vae` and `paligemma convert-vae`."""
    from .vae import VAE_URL, convert_vae, default_vae_path, download_vae

    if name == "download-vae":
        p = Parser(prog="paligemma download-vae", description=(
            "Download big_vision's mask decoder (vae-oid.npz, the VQ-VAE that turns <seg> codes into masks) "
            f"from {VAE_URL}, print its sha256 and store it beside the file."))
        p.add_argument("--out", default=None, metavar="PATH", help=f"where to put it (default {default_vae_path()}, where segment finds it)")
        p.add_argument("--url", default=VAE_URL, help="a mirror of the file (default big_vision's public bucket)")
        p.add_argument("--force", action="store_true", help="download again over an existing file")
        args = p.parse_args(argv)
        path, digest = download_vae(args.out, url=args.url, force=args.force)
        print(f"saved {path}\nsha256 {digest} (written to {path.name}.sha256)")
        return 0
    p = Parser(prog="paligemma convert-vae", description="Copy the mask decoder's tensors of vae-oid.npz to a safetensors file (same names).")
    p.add_argument("source", help="vae-oid.npz")
    p.add_argument("out", help="OUT.safetensors")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    print(f"saved {convert_vae(args.source, args.out, force=args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
