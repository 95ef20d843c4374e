"""`paligemma finetune` (train a LoRA adapter) and `paligemma merge` (fold one into a checkpoint).

    paligemma finetune train.jsonl -o my-adapter --model google/paligemma2-3b-pt-224 --epochs 3
    paligemma finetune train.jsonl -o my-adapter --resume          # after Ctrl-C, or for more epochs
    paligemma caption cat.jpg --model google/paligemma2-3b-pt-224 --adapter my-adapter
    paligemma merge google/paligemma2-3b-pt-224 my-adapter -o my-model

DATA is a JSONL file of {"image": PATH, "prefix": TEXT, "suffix": TEXT}, image paths relative to
the file. The adapter folder is PEFT's layout (transformers + PEFT load it as is); it is rewritten
whole, atomically, at the end of each epoch, at the end and on Ctrl-C, with the optimizer's state
beside it so that --resume continues the run where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .adapter import DEFAULT_TARGETS, LoraConfig, merge, parse_targets, read_adapter
from .api import BACKENDS, DTYPES
from .errors import OutputError, PaliGemmaError, SettingError
from .training import STATE_FILE, TrainSettings, read_jsonl, train
from .usage import Parser, UsageError


def build_parser() -> Parser:
    p = Parser(
        prog="paligemma finetune",
        description="Train a LoRA adapter of PaliGemma on (image, prefix, suffix) examples.",
        epilog="Exit codes: 0 done, 2 bad input or setting, 130 interrupted (the adapter is saved first).",
    )
    p.add_argument("data", metavar="DATA", help="JSONL of {image, prefix, suffix} (image paths relative to the file)")
    p.add_argument("-o", "--out", required=True, metavar="ADAPTER_DIR", help="the adapter folder to write")
    p.add_argument("--model", default="google/paligemma2-3b-pt-224", help="base checkpoint folder or repo id (default google/paligemma2-3b-pt-224; `demo` = the tiny random one)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype of the base (default: the backend's); LoRA weights are float32")
    p.add_argument("--quantize", type=int, choices=(4, 8), metavar="BITS", help="quantize the base text decoder (QLoRA; 4 bits on mlx only)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha / r (default 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help=f"layers to adapt (default {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="batches per optimizer step (default 1)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    p.add_argument("--val", metavar="DATA", help="JSONL of validation examples; their loss is printed each epoch")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation and the example order")
    p.add_argument("--resume", action="store_true", help="continue the run saved in ADAPTER_DIR")
    p.add_argument("--force", action="store_true", help="start over even if ADAPTER_DIR holds a run")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(f"{e} (see paligemma finetune --help)")
    try:
        return run(args)
    except PaliGemmaError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


def run(args) -> int:
    from . import api

    out = Path(args.out).expanduser()
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                             max_steps=args.max_steps, weight_decay=args.weight_decay, seed=args.seed).validate()
    if args.resume:
        if not (out / STATE_FILE).is_file():
            raise SettingError(f"{out}: no run to resume there (no {STATE_FILE})")
        config, _ = read_adapter(out)
    else:
        if out.exists() and not args.force:
            raise OutputError(f"{out}: already exists; pass --resume to continue its run or --force to start over")
        if not out.parent.is_dir():
            raise OutputError(f"{out}: the folder {out.parent} does not exist")
        config = LoraConfig(r=args.rank, alpha=args.alpha, targets=parse_targets(args.targets), dropout=args.dropout,
                            base_model=str(args.model)).validate()
    examples = read_jsonl(args.data)
    val = read_jsonl(args.val) if args.val else None
    try:
        model = api.load(args.model, backend=args.backend, dtype=args.dtype, quantize=args.quantize)
    except ImportError as e:
        raise SettingError(f"the {api.pick_backend(args.backend)} backend cannot start: {e}") from None
    if args.resume:
        model.load_adapter(out)
    else:
        model.add_lora(config, seed=args.seed)
    n = sum(w.size for w in model.backend.lora_weights().values())
    print(f"{len(examples)} examples, LoRA r={config.r} alpha={config.alpha:g} on {','.join(config.targets)}: "
          f"{n:,} trainable weights ({model.backend.name}, {model.backend.dtype})", file=sys.stderr)
    try:
        state = train(model, config, examples, out, settings, val=val, resume=args.resume, progress=not args.quiet,
                      log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        return 130
    last = state["losses"][-1] if state["losses"] else float("nan")
    print(f"saved {out} (step {state['step']}, last loss {last:.4f})", file=sys.stderr)
    return 0


def build_merge_parser() -> Parser:
    p = Parser(prog="paligemma merge", description="Merge a LoRA adapter into a plain checkpoint folder.")
    p.add_argument("base", metavar="BASE", help="the base checkpoint folder or repo id")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="the LoRA adapter folder (PEFT's layout)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (only once the new folder is complete)")
    return p


def merge_main(argv: list[str] | None = None) -> int:
    try:
        args = build_merge_parser().parse_args(argv)
    except UsageError as e:
        return _fail(f"{e} (see paligemma merge --help)")
    try:
        out = merge(args.base if args.base != "demo" else _demo(), args.adapter, args.out, force=args.force)
    except PaliGemmaError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(out)
    return 0


def _demo() -> str:
    from .demo import demo_checkpoint

    return str(demo_checkpoint())


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
