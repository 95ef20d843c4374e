"""The public API: `load` a checkpoint on a backend, then generate, stream, score or batch.

This is the glue between the core pieces (checkpoint, processor, tokenizer, generation loop)
and one backend; it holds no model math.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

# BACKENDS and DTYPES: the choices of `load` the surfaces offer, from the backend interface
from .backend import BACKENDS, DTYPES, Backend, pick_backend
from .checkpoint import open_checkpoint
from .detection import parse_detections
from .errors import PromptError, SettingError
from .generate import Stats, generate_steps, left_pad
from .processor import ImageSettings, pixel_values, read_image_settings
from .prompts import is_detection_prompt, is_segmentation_prompt, task_prompt
from .sampling import LogitsProcessor, SamplingParams, logits_processors, per_row
from .tokenizer import StreamDecoder, Tokenizer

FEATURE_CACHE_SIZE = 8


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids, eos excluded
    stats: Stats
    image_size: tuple[int, int] = (0, 0)  # (width, height) of the original image
    finished_by: str = "max_tokens"  # "eos", "stop" (a stop string), "max_tokens", "context" or "cancelled"
    # the boxes of a `detect` answer (Detections, pixels of the original image); Model.segment puts
    # there the objects given a box without mask codes
    detections: list = field(default_factory=list)
    segments: list = field(default_factory=list)  # filled by Model.segment: Segments (masks), with .invalid


def load(
    path_or_repo: str | os.PathLike,
    backend: str = "auto",
    dtype: str | None = None,
    device: str | None = None,
    quantize: int | None = None,
    group_size: int = 64,
    vae: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
) -> "Model":
    """Load a PaliGemma checkpoint (folder or Hugging Face repo id; `demo` for the built-in one).

    vae: big_vision's mask decoder file for `segment` (vae-oid.npz or its safetensors copy); read
    now when given, else found when first needed ($PALIGEMMA_VAE, `paligemma download-vae`).
    adapter: a LoRA adapter folder in PEFT's layout (ours from `paligemma finetune`, or PEFT's),
    applied on top of the (possibly quantized) weights.
    """
    engine_class = backend_class(pick_backend(backend))
    engine_class.check_settings(dtype, device, quantize, group_size)  # before any file is read
    if str(path_or_repo) == "demo":
        from .demo import demo_checkpoint

        path_or_repo = demo_checkpoint()
    checkpoint = open_checkpoint(path_or_repo)
    tokenizer = Tokenizer(checkpoint.folder)
    config = checkpoint.config
    images = read_image_settings(checkpoint.folder, config.image_size, config.num_image_tokens)
    engine = engine_class(checkpoint, dtype=dtype, device=device, quantize=quantize, group_size=group_size)
    model = Model(engine, tokenizer, source=str(path_or_repo), images=images)
    if vae is not None:
        model.vae = model.load_vae(vae)
    if adapter is not None:
        model.load_adapter(adapter)
    return model


def backend_class(name: str) -> type[Backend]:
    """The class of the backend `name` ("mlx" or "torch"), its framework imported only now."""
    if name == "mlx":
        from .mlx_backend.backend import MLXBackend

        return MLXBackend
    from .torch_backend.backend import TorchBackend

    return TorchBackend


class Model:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, source: str = "", images: ImageSettings | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = backend.config
        self.images = images or ImageSettings(self.config.image_size)  # the checkpoint's preprocessor_config.json
        self.source = source
        self.is_demo = self.config.demo
        self.last: Generation | None = None
        self.adapter = None  # the LoRA config (adapter.LoraConfig) when LoRA layers are on
        self._features: OrderedDict[bytes, object] = OrderedDict()
        self.vocab_limit = min(tokenizer.vocab_size, self.config.text.vocab_size)
        self.context_len = self.config.text.max_position_embeddings
        self.vae = None  # the mask decoder, loaded by the first segment() unless given to load()
        self._object_grammars: dict[bool, object] = {}  # segment? -> ObjectGrammar, built on first use

    def load_adapter(self, folder: str | os.PathLike) -> None:
        """Apply a LoRA adapter folder (PEFT's layout) to this model's text decoder."""
        from .adapter import check_fits, read_adapter
        from .checkpoint import expected_shapes

        config, weights = read_adapter(folder)
        check_fits(weights, expected_shapes(self.config))
        self.backend.add_lora(config, weights)
        self.adapter = config
        self._features.clear()

    def add_lora(self, config, seed: int = 0) -> None:
        """New LoRA layers (PEFT's initialisation: B = 0, so the model is unchanged until trained)."""
        from .adapter import init_weights
        from .checkpoint import expected_shapes

        config.validate()
        shapes = expected_shapes(self.config)
        paths = config.module_paths(self.config.text.num_hidden_layers)
        self.backend.add_lora(config, init_weights(config, {p: shapes[p + ".weight"] for p in paths}, seed))
        self.adapter = config

    def loss(self, image, prompt: str, suffix: str) -> float:
        """PaliGemma's training loss: mean cross-entropy of the suffix tokens and the closing eos.

        The prefix (image, bos, prompt, newline) attends bidirectionally and is not predicted; the
        suffix attends causally. Equal to transformers' loss with the labels of its processor.
        """
        return self.loss_batch([image], [prompt], [suffix])

    def loss_batch(self, images: Sequence, prompts: Sequence[str], suffixes: Sequence[str]) -> float:
        """The loss of a batch: the mean over every suffix token (and eos) of every row, as transformers."""
        from .training import make_batch

        total, count = self.backend.loss_sums(make_batch(self, list(images), list(prompts), list(suffixes)))
        return total / count

    def prompt_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be text, got {type(prompt).__name__}")
        ids = self.tokenizer.prompt_ids(prompt, self.config.num_image_tokens, self.config.image_token_index)
        if len(ids) >= self.context_len:
            raise PromptError(
                f"prompt is {len(ids)} tokens with the image, the model's context is {self.context_len}; shorten it"
            )
        return ids

    def _features_for(self, pixels: np.ndarray):
        """Device features for a batch of pixels, computing only images not seen recently."""
        keys = [hashlib.sha256(p.tobytes()).digest() for p in pixels]
        # the first row of each image not in the cache: an image twice in a batch is encoded once
        missing, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self._features and k not in seen:
                seen.add(k)
                missing.append(i)
        if missing:
            computed = self.backend.image_features(pixels[missing])
            for j, i in enumerate(missing):
                self._features[keys[i]] = self.backend.slice_features(computed, j)
        for k in keys:
            self._features.move_to_end(k)
        rows = [self._features[k] for k in keys]
        while len(self._features) > FEATURE_CACHE_SIZE:
            self._features.popitem(last=False)
        return rows[0] if len(rows) == 1 else self.backend.stack_features(rows)

    def check(self, prompt: str, params: SamplingParams | None = None, **settings) -> None:
        """Raise the SettingError or PromptError that `generate` would, without running the model."""
        self.sampling(params, **settings)
        self.prompt_ids(prompt)

    def sampling(self, params: SamplingParams | None = None, **settings) -> SamplingParams:
        """`params` (or the defaults) with keyword settings replacing its fields, checked for this model."""
        return SamplingParams.from_settings(params, **settings).validate(self.context_len)

    def _grammar(self, prompts: Sequence[str], params: Sequence[SamplingParams], prefix_len: int, sizes) -> list[LogitsProcessor]:
        """A processor holding each detect/segment row whose settings say constrain to the objects'
        grammar (`params`: each row's; `prefix_len`: the padded prompt length, so a row may generate
        min(its max_tokens, context - prefix_len) tokens; `sizes`: each row's original image size,
        where masks are cut); no processor when no row needs one."""
        if not any(p.constrain and is_detection_prompt(q) for q, p in zip(prompts, params)):
            return []
        from .grammar import GrammarProcessor, ObjectGrammar

        grammars, steps = [], []
        for prompt, p in zip(prompts, params):
            steps.append(min(p.max_tokens, self.context_len - prefix_len))
            if not (p.constrain and is_detection_prompt(prompt)):
                grammars.append(None)
                continue
            segment = is_segmentation_prompt(prompt)
            if segment not in self._object_grammars:
                self._object_grammars[segment] = ObjectGrammar(self.tokenizer, segment, self.vocab_limit)
            grammars.append(self._object_grammars[segment])
        return [GrammarProcessor(grammars, steps, self.tokenizer.eos_id, sizes)]

    def _run(self, images, prompts, params, processors) -> list[Generation]:
        gen = self._iterate(images, prompts, params, processors)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def _iterate(self, images, prompts, params: SamplingParams | Sequence[SamplingParams],
                 processors: Sequence[LogitsProcessor], ended: list[str] | None = None):
        """Yield (row, text piece) as tokens arrive; return the list of Generations.

        params: one for every row, or one per row. ended: the loop's list of end reasons, given
        when the caller ends rows itself between steps (BatchStream.cancel)."""
        rows = [self.prompt_ids(p) for p in prompts]
        pixels, sizes = pixel_values(images, self.images)
        ids, pad = left_pad(rows, self.config.pad_token_id)
        stats = Stats()
        out: list[list[int]] = [[] for _ in rows]
        ended = ended if ended is not None else [""] * len(rows)
        each = per_row(params, len(rows))
        decoders = [StreamDecoder(self.tokenizer, p.stop) for p in each]
        # the grammar comes last: whatever the other processors did, the answer stays well formed
        processors = logits_processors(params, rows) + list(processors) + self._grammar(prompts, each, ids.shape[1], sizes)
        for tokens, kept in generate_steps(
            self.backend, ids, pad, lambda: self._features_for(pixels), params, self.config.eos_token_ids,
            self.vocab_limit, self.context_len, stats, processors, ended,
        ):
            for b in np.flatnonzero(kept):
                out[b].append(int(tokens[b]))
                piece = decoders[b].push(int(tokens[b]))
                if piece:
                    yield b, piece
                if decoders[b].stopped:
                    ended[b] = "stop"
        results = []
        for b, decoder in enumerate(decoders):
            piece = decoder.flush()
            if piece:
                yield b, piece
            row_stats = Stats(**stats.to_dict())
            row_stats.prompt_tokens, row_stats.generated_tokens = len(rows[b]), len(out[b])
            result = Generation(decoder.text, out[b], row_stats, sizes[b], ended[b])
            if is_detection_prompt(prompts[b]) and not is_segmentation_prompt(prompts[b]):
                result.detections = parse_detections(result.text, result.image_size)
            results.append(result)
        return results

    def generate(
        self, image, prompt: str, params: SamplingParams | None = None, *,
        logits_processors: Sequence[LogitsProcessor] = (), **settings,
    ) -> Generation:
        """The answer to one prompt about one image.

        Settings as keywords (max_tokens, temperature, top_p, top_k, seed, min_tokens,
        repetition_penalty, stop, constrain) or as a SamplingParams (keywords then replace its fields).
        constrain=True holds a detect/segment prompt's answer to the objects' grammar (see grammar).
        logits_processors: extra `processor(generated, logits)` callables (see sampling).
        """
        params = self.sampling(params, **settings)
        return self._run([image], [prompt], params, logits_processors)[0]

    def stream(
        self, image, prompt: str, params: SamplingParams | None = None, *,
        logits_processors: Sequence[LogitsProcessor] = (), **settings,
    ) -> Iterator[str]:
        """Text pieces as they come. The generator's return value (and `self.last`) is the Generation."""
        params = self.sampling(params, **settings)
        gen = self._iterate([image], [prompt], params, logits_processors)
        while True:
            try:
                _, piece = next(gen)
            except StopIteration as stop:
                self.last = stop.value[0]
                return self.last
            yield piece

    def logits(self, image, prompt: str, suffix: str | Sequence[int] | None = None) -> np.ndarray:
        """float32 logits [prefix_len + len(suffix), vocab] of one forward pass.

        The suffix (token ids or text) attends causally, as generated tokens do.
        """
        ids = self.prompt_ids(prompt)
        prefix_len = len(ids)
        if suffix is not None:
            ids = ids + (self.tokenizer.encode(suffix) if isinstance(suffix, str) else [int(t) for t in suffix])
        if len(ids) > self.context_len:
            raise PromptError(f"prompt and suffix are {len(ids)} tokens, the model's context is {self.context_len}")
        pixels, _ = pixel_values([image], self.images)
        return self.backend.forward_logits(np.array([ids]), self._features_for(pixels), prefix_len)

    def generate_batch(
        self, images: Sequence, prompts: Sequence[str], params: SamplingParams | None = None, *,
        logits_processors: Sequence[LogitsProcessor] = (), **settings,
    ) -> list[Generation]:
        """One result per (image, prompt) pair, each the same as `generate` on that pair alone."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(images) != len(prompts):
            raise SettingError(f"generate_batch needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        params = self.sampling(params, **settings)
        if not images:
            return []
        return self._run(list(images), list(prompts), params, logits_processors)

    def stream_batch(
        self, images: Sequence, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None, *,
        logits_processors: Sequence[LogitsProcessor] = (), **settings,
    ) -> "BatchStream":
        """A batch whose text arrives as it is generated: iterate for (row, text piece).

        params: one SamplingParams for every row, or a list with one per row (each row then gets
        the ids `generate` gives with its own settings); keywords replace fields of each.
        `cancel(row)` ends a row between two steps (finished_by "cancelled"); the batch stops
        when every row has ended. `.results` holds the Generations once the iteration is over.
        """
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(images) != len(prompts):
            raise SettingError(f"stream_batch needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        if params is None or isinstance(params, SamplingParams):
            rows = self.sampling(params, **settings)
        else:
            rows = [self.sampling(p, **settings) for p in per_row(params, len(images))]
        return BatchStream(self, list(images), list(prompts), rows, logits_processors)

    def load_vae(self, path: str | os.PathLike):
        """Read a mask decoder file onto this model's backend (and device)."""
        from .vae import load_vae

        return load_vae(path, backend=self.backend.name, device=self.backend.device)

    def mask_decoder(self):
        """The mask decoder `segment` uses: the one given to `load`, else $PALIGEMMA_VAE, else the
        demo decoder for the demo checkpoint, else the one `paligemma download-vae` stored."""
        if self.vae is None:
            from .vae import VAE_ENV, find_vae, missing_vae_message

            path = find_vae() if os.environ.get(VAE_ENV) or not self.is_demo else None
            if path is None and self.is_demo:
                from .demo import demo_vae

                path = demo_vae()
            if path is None:
                raise SettingError(missing_vae_message())
            self.vae = self.load_vae(path)
        return self.vae

    def detect(self, image, things: str, params: SamplingParams | None = None, **settings) -> Generation:
        """`detect things` on `image`: the Generation with `.detections` (boxes in pixels of the
        original image). Settings as for `generate`; constrain=True keeps the answer well formed."""
        return self.generate(image, task_prompt("detect", things), params, **settings)

    def segment(self, image, things: str, params: SamplingParams | None = None, **settings) -> Generation:
        """`segment things` on `image`: the Generation, with `.segments` (masks in pixels of the
        original image, `.segments.invalid` the malformed objects) and `.detections` (objects the
        model gave a box without mask codes). Settings as for `generate`; with constrain=True every
        object has its box, sixteen codes and a label."""
        from .segmentation import parse_segments

        vae = self.mask_decoder()  # before generating: a missing decoder should not cost a generation
        out = self.generate(image, task_prompt("segment", things), params, **settings)
        out.segments = parse_segments(out.text, out.image_size, vae)
        out.detections = out.segments.detections
        return out


class BatchStream:
    """The iterator `Model.stream_batch` returns: (row, text piece) pairs from the one generation loop."""

    def __init__(self, model: Model, images: list, prompts: list[str], params, processors: Sequence[LogitsProcessor]):
        # the loop reads this list between steps: a row given a reason here is ended there
        self.ended = [""] * len(images)
        self.results: list[Generation] | None = None
        self._steps = model._iterate(images, prompts, params, processors, self.ended) if images else iter(())

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[int, str]:
        try:
            return next(self._steps)
        except StopIteration as stop:
            self.results = stop.value or []
            raise StopIteration from None

    def cancel(self, row: int) -> None:
        """End `row` before the next step (safe to call from another thread: one list item is set)."""
        if not self.ended[row]:
            self.ended[row] = "cancelled"
