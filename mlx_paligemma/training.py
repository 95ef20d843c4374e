"""Fine-tuning: PaliGemma's loss on (image, prefix, suffix) rows, the data, and the one training loop.

The loss is transformers' for PaliGemma with `labels` from its processor: the row is
`<image>` x N, `<bos>`, prefix, `\\n`, suffix, `<eos>`; the prefix attends bidirectionally, the
suffix causally (token_type_ids 0 and 1), and only the suffix tokens and the closing eos are
predicted (the prefix's labels are -100). The mean is over every predicted token of the batch.

The loop knows nothing about frameworks: a backend's `Trainer` accumulates gradients and steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .detection import LOC_BINS
from .errors import PromptError, SettingError

IGNORE = -1  # target of positions that predict nothing (prefix, padding)
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class Batch:
    input_ids: np.ndarray  # (B, T) right-padded rows: prefix, suffix, eos, padding
    targets: np.ndarray  # (B, T) the id position t must predict (ids[t + 1]) where it is a suffix token or eos, else IGNORE
    prefix_lens: np.ndarray  # (B,) image tokens + bos + prompt + newline
    lengths: np.ndarray  # (B,) tokens before the padding
    pixels: np.ndarray  # (B, 3, S, S) float32

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def make_batch(model, images, prompts, suffixes) -> Batch:
    """Tokenize (image, prompt, suffix) rows for `model` (an api.Model) into one right-padded Batch."""
    from .processor import pixel_values

    if not (len(images) == len(prompts) == len(suffixes)) or not images:
        raise SettingError(f"a batch needs as many images, prompts and suffixes (got {len(images)}, {len(prompts)}, {len(suffixes)})")
    tok = model.tokenizer
    rows, prefix_lens = [], []
    for prompt, suffix in zip(prompts, suffixes):
        if not isinstance(suffix, str):
            raise PromptError(f"suffix must be text, got {type(suffix).__name__}")
        prefix = model.prompt_ids(prompt)
        row = prefix + tok.encode(suffix) + [tok.eos_id]
        if len(row) > model.context_len:
            raise PromptError(f"prompt and suffix are {len(row)} tokens, the model's context is {model.context_len}")
        rows.append(row)
        prefix_lens.append(len(prefix))
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), model.config.pad_token_id, dtype=np.int64)
    targets = np.full((len(rows), T), IGNORE, dtype=np.int64)
    for b, (row, p) in enumerate(zip(rows, prefix_lens)):
        ids[b, : len(row)] = row
        # position t predicts token t + 1: the last prefix position predicts the first suffix token
        targets[b, p - 1 : len(row) - 1] = row[p:]
    pixels, _ = pixel_values(list(images), model.images)
    return Batch(ids, targets, np.array(prefix_lens), np.array([len(r) for r in rows]), pixels)



@dataclass
class Example:
    image: str  # a path (resolved against the JSONL file's folder)
    prefix: str
    suffix: str


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """A JSONL file of {"image": PATH, "prefix": TEXT, "suffix": TEXT}; image paths relative to the file."""
    path = Path(os.path.expanduser(str(path)))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SettingError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SettingError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SettingError(f"{path}:{n}: each line must be an object with image, prefix and suffix")
        for key in ("image", "prefix", "suffix"):
            if not isinstance(row.get(key), str):
                raise SettingError(f"{path}:{n}: `{key}` must be a string")
        image = Path(os.path.expanduser(row["image"]))
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise SettingError(f"{path}:{n}: image {row['image']} not found (looked at {image})")
        examples.append(Example(str(image), row["prefix"], row["suffix"]))
    if not examples:
        raise SettingError(f"{path}: no examples")
    return examples


def loc_bin(v: float, size: int) -> int:
    """A pixel coordinate -> its `<locNNNN>` bin: the inverse of detection.py's bin / 1024 * size."""
    return min(max(int(round(v / size * LOC_BINS)), 0), LOC_BINS - 1)


def box_locs(box, width: int, height: int) -> str:
    """A COCO box [x, y, w, h] in pixels -> `<locY0><locX0><locY1><locX1>` as parse_detections reads them."""
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0 or width <= 0 or height <= 0:
        raise SettingError(f"box {list(box)} in an image of {width}x{height}: sizes must be positive")
    y0, x0, y1, x1 = loc_bin(y, height), loc_bin(x, width), loc_bin(y + h, height), loc_bin(x + w, width)
    return f"<loc{y0:04d}><loc{x0:04d}><loc{y1:04d}><loc{x1:04d}>"


def detect_example(boxes, labels, width: int, height: int) -> tuple[str, str]:
    """COCO boxes with their labels -> (prefix, suffix) of a `detect` training row.

    prefix `detect a ; b` (each label once, in order of appearance), suffix
    `<loc..>x4 a ; <loc..>x4 b` as the model answers.
    """
    if len(boxes) != len(labels):
        raise SettingError(f"{len(boxes)} boxes but {len(labels)} labels")
    things = list(dict.fromkeys(labels))
    suffix = " ; ".join(f"{box_locs(b, width, height)} {label}" for b, label in zip(boxes, labels))
    return "detect " + " ; ".join(things), suffix


def coco_examples(annotations: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[dict]:
    """A COCO instances JSON -> JSONL rows {image, prefix, suffix}, one `detect` row per image with boxes."""
    path = Path(annotations)
    coco = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_image: dict[int, list] = {}
    for a in coco.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    root = Path(images_dir) if images_dir else path.parent
    rows = []
    for im in coco.get("images", []):
        anns = by_image.get(im["id"])
        if not anns:
            continue
        prefix, suffix = detect_example([a["bbox"] for a in anns], [names[a["category_id"]] for a in anns], im["width"], im["height"])
        rows.append({"image": str(root / im["file_name"]), "prefix": prefix, "suffix": suffix})
    return rows



@dataclass
class TrainSettings:
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; None: run the epochs
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> "TrainSettings":
        for name in ("epochs", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SettingError(f"{name.replace('_', '-')} must be a whole number >= 1, got {v!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise SettingError(f"max-steps must be a whole number >= 1, got {self.max_steps!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise SettingError(f"lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.weight_decay < 1:
            raise SettingError(f"weight-decay must be in [0, 1), got {self.weight_decay!r}")
        return self


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The example order of one epoch: the same for the same seed, so that a resumed run continues it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def evaluate(model, examples: list[Example], batch_size: int) -> float:
    """Mean loss over every target token of `examples`."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        s, n = model.backend.loss_sums(make_batch(model, [e.image for e in chunk], [e.prefix for e in chunk], [e.suffix for e in chunk]))
        total, count = total + s, count + n
    return total / max(count, 1)


def save_checkpoint(out: Path, model, lora_config, trainer, state: dict) -> None:
    """The adapter, the optimizer's state and where the run is, as one folder written atomically."""
    from safetensors.numpy import save

    from .adapter import write_adapter

    extra = {OPTIMIZER_FILE: save(trainer.state()), STATE_FILE: (json.dumps(state, indent=2) + "\n").encode()}
    write_adapter(out, lora_config, model.backend.lora_weights(), extra)


def load_checkpoint(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    try:
        state = json.loads((out / STATE_FILE).read_text())
        return state, load_file(str(out / OPTIMIZER_FILE))
    except (OSError, json.JSONDecodeError) as e:
        raise SettingError(f"{out}: cannot resume, no complete trainer state there ({e})") from None


def train(model, lora_config, examples: list[Example], out: Path, settings: TrainSettings,
          val: list[Example] | None = None, resume: bool = False, log=print, progress=True) -> dict:
    """Train LoRA weights on `examples`, checkpointing `out` each epoch, at the end and on Ctrl-C.

    model: an api.Model whose backend has LoRA layers (add_lora) or gets them here from `out` when
    resuming. Returns the final trainer state (step, epoch, losses).
    """
    settings.validate()
    backend = model.backend
    trainer = backend.trainer(settings.lr, settings.weight_decay)
    per_epoch = math.ceil(len(examples) / (settings.batch_size * settings.grad_accum))
    total = settings.max_steps if settings.max_steps is not None else per_epoch * settings.epochs
    state = {"step": 0, "epoch": 0, "batch": 0, "settings": asdict(settings), "losses": [], "val_losses": []}
    if resume:
        saved, optimizer = load_checkpoint(out)
        trainer.load_state(optimizer)
        state.update({k: saved[k] for k in ("step", "epoch", "batch", "losses", "val_losses")})
        log(f"resuming at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    bar = _progress_bar(total, state["step"], progress)
    started, seen_tokens = time.perf_counter(), 0
    interrupted = False
    try:
        while state["step"] < total and state["epoch"] < settings.epochs:
            order = epoch_order(len(examples), state["epoch"], settings.seed)
            batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
            while state["batch"] < len(batches) and state["step"] < total:
                group = batches[state["batch"] : state["batch"] + settings.grad_accum]
                loss_sum, count = 0.0, 0
                for idx in group:
                    chunk = [examples[i] for i in idx]
                    batch = make_batch(model, [e.image for e in chunk], [e.prefix for e in chunk], [e.suffix for e in chunk])
                    s, n = trainer.accumulate(batch)
                    loss_sum, count, seen_tokens = loss_sum + s, count + n, seen_tokens + batch.n_tokens
                trainer.update(count)
                state["step"] += 1
                state["batch"] += len(group)
                loss = loss_sum / max(count, 1)
                state["losses"].append(round(loss, 6))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seen_tokens / (time.perf_counter() - started):.0f}", epoch=state["epoch"] + 1)
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
                if val:
                    state["val_losses"].append(round(evaluate(model, val, settings.batch_size), 6))
                    bar.write(f"epoch {state['epoch']}: validation loss {state['val_losses'][-1]:.4f}")
                save_checkpoint(out, model, lora_config, trainer, state)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if interrupted:
        # a gradient half-accumulated is dropped: the checkpoint is the state after the last full step
        with _ignoring_interrupts():
            save_checkpoint(out, model, lora_config, trainer, state)
        log(f"interrupted: saved step {state['step']} to {out}; continue with --resume")
        raise KeyboardInterrupt
    save_checkpoint(out, model, lora_config, trainer, state)
    return state


class _ignoring_interrupts:
    """A second Ctrl-C while the checkpoint is written would leave only the temporary folder behind."""

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            self.old = None

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)

