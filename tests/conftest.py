"""Tiny random PaliGemma checkpoints built with transformers (the oracle), and the oracle itself.

Every checkpoint folder holds a sentencepiece tokenizer with the real special-token layout
(mlx_paligemma.demo.build_tokenizer), a config.json and safetensors weights, in the hub layout
(`language_model.model...`, `vision_tower.vision_model...`) or as transformers 5.x's
save_pretrained writes it.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMAGE_SIZE = 56  # 4 x 4 patches of 14 px: 16 image tokens

TEXT_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512)

# name -> (text_config overrides, layout, stored dtype, shards)
CHECKPOINTS = {
    # PaliGemma 2, query_pre_attn_scalar != head_dim, the 5.x save_pretrained layout
    "pg2": (dict(model_type="gemma2", query_pre_attn_scalar=24, sliding_window=4096), "5x", "float32", 1),
    # PaliGemma 2 with a sliding window shorter than the prefix (16 image tokens + prompt), hub layout, sharded
    "pg2_window": (dict(model_type="gemma2", query_pre_attn_scalar=16, sliding_window=8), "hub", "float32", 2),
    # PaliGemma 1 (Gemma 1 text, one kv head as in the real 3B), hub layout
    "pg1": (dict(model_type="gemma", num_key_value_heads=1, hidden_act="gelu_pytorch_tanh",
                 hidden_activation="gelu_pytorch_tanh"), "hub", "float32", 1),
}


@dataclass
class Fixture:
    name: str
    folder: Path
    real_vocab: int  # ids >= this are the embedding's padding rows
    image_token: int


def _paligemma_config(text_overrides: dict, real_vocab: int):
    from transformers import PaliGemmaConfig

    vocab = (real_vocab + 1 + 63) // 64 * 64  # padded past `<image>`, as the real 257152 -> 257216
    text = dict(TEXT_BASE, vocab_size=vocab, **text_overrides)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=14, image_size=IMAGE_SIZE, vision_use_head=False,
                  layer_norm_eps=1e-6, projection_dim=64)
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=real_vocab,
                           projection_dim=64, hidden_size=64, vocab_size=vocab)


def _randomize(model, seed: int, round_to=None) -> None:
    """Weights by the demo checkpoint's rule (transformers' init is near zero: greedy choices would be near ties).

    round_to (a torch dtype): each weight rounded to it, kept in the model's dtype (the values a
    checkpoint stored in that dtype holds)."""
    import torch

    from mlx_paligemma.checkpoint import canonical_name
    from mlx_paligemma.demo import init_rule

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = init_rule(canonical_name(name), tuple(p.shape))
            w = torch.randn(p.shape, generator=gen) * std + mean
            p.copy_(w if round_to is None else w.to(round_to))


def _hub_name(key: str) -> str | None:
    for prefix, to in (("model.vision_tower.", "vision_tower.vision_model."),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("model.language_model.", "language_model.model.")):
        if key.startswith(prefix):
            return to + key[len(prefix):]
    return None  # lm_head: tied to the embedding, the hub files do not store it


def _write_hub_layout(model, folder: Path, dtype: str, shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        name = _hub_name(k)
        if name is not None:
            state[name] = v.to(getattr(torch, dtype)).contiguous()
    names = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_checkpoint(folder: Path, text_overrides: dict, layout: str, dtype: str = "float32",
                     shards: int = 1, seed: int = 0) -> Fixture:
    import sentencepiece as spm
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    from mlx_paligemma.demo import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    real_vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    config = _paligemma_config(text_overrides, real_vocab)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    _randomize(model, seed)
    if layout == "5x":
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
        _write_hub_layout(model, folder, dtype, shards)
    return Fixture(folder.name, folder, real_vocab, real_vocab)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Fixture]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_checkpoint(root / name, *spec) for name, spec in CHECKPOINTS.items()}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The demo checkpoint and histories go to a per-session folder, not the user's cache."""
    os.environ["MLX_PALIGEMMA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


class Oracle:
    """transformers' PaliGemma on a checkpoint folder, float32, eager attention."""

    def __init__(self, fixture: Fixture):
        import torch
        from transformers import AutoTokenizer, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        self.fixture = fixture
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(
            fixture.folder, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(fixture.folder)
        ip = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        ip.image_seq_length = (IMAGE_SIZE // 14) ** 2
        self.processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer)

    def inputs(self, image, prompt: str) -> dict:
        return self.processor(images=image, text="<image>" + prompt, return_tensors="pt")

    def logits(self, image, prompt: str, suffix: list[int] | None = None) -> np.ndarray:
        import torch

        inputs = self.inputs(image, prompt)
        ids = inputs["input_ids"]
        types = torch.zeros_like(ids)  # 0: prefix (bidirectional), 1: suffix (causal)
        if suffix:
            ids = torch.cat([ids, torch.tensor([suffix])], dim=1)
            types = torch.cat([types, torch.ones(1, len(suffix), dtype=types.dtype)], dim=1)
        with torch.no_grad():
            out = self.model(input_ids=ids, pixel_values=inputs["pixel_values"], token_type_ids=types,
                             attention_mask=torch.ones_like(ids))
        return out.logits[0].float().numpy()

    def greedy(self, image, prompt: str, n: int, **settings) -> list[int]:
        """At most n greedy ids, eos suppressed (min_new_tokens) and never a padding row of the embedding.

        settings: more of generate's arguments (repetition_penalty, stop_strings, ...).
        """
        import torch

        inputs = self.inputs(image, prompt)
        pad_rows = list(range(self.fixture.real_vocab, self.model.config.text_config.vocab_size))
        if "stop_strings" in settings:
            settings["tokenizer"] = self.processor.tokenizer
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      suppress_tokens=pad_rows, **settings)
        return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="session")
def oracles(checkpoints):
    cache: dict[str, Oracle] = {}

    def get(name: str) -> Oracle:
        if name not in cache:
            cache[name] = Oracle(checkpoints[name])
        return cache[name]

    return get


def make_image(seed: int, width: int = 70, height: int = 45) -> np.ndarray:
    """A smooth random RGB image (not square, so the resize squashes it)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 5 + 1, width // 5 + 1, 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))


def kernels_absent_reason() -> str | None:
    """Why this machine is not one the AVX2 kernels are for (None: they must build and run here):
    the backend's own reason, or no C++ compiler to build them with."""
    import shutil

    from mlx_paligemma.torch_backend.backend import cpu_kernels_unwanted

    compiler = os.environ.get("CXX", "c++")
    return cpu_kernels_unwanted() or (None if shutil.which(compiler) else f"no C++ compiler ({compiler}) to build the kernels with")


def require_kernels() -> None:
    """Skip where the kernels are not meant to run; where they are, a failed build fails the test."""
    reason = kernels_absent_reason()
    if reason:
        pytest.skip(reason)
    from mlx_paligemma.torch_backend import cpu_kernels

    assert cpu_kernels.build() is not None, "the CPU kernels did not build on a machine that should build them"


def interruptible() -> None:
    """preexec_fn of a child that a test interrupts with SIGINT, as Ctrl-C at a terminal would. A shell
    starts a background job (`cmd &` without job control, as CI runners and nohup do) with SIGINT
    ignored; its children inherit that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
