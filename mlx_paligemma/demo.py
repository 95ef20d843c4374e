"""The built-in demo checkpoint: a tiny random-weight PaliGemma 2 with the real layout.

`--model demo` resolves here. The folder is generated deterministically (numpy, sentencepiece)
and cached, so the whole path (image, processor, tokenizer, model, generation, detection) runs
on a fresh machine without a download. Its outputs are random text: the weights are random.

The tokenizer has the real special-token layout: pad 0, eos 1, bos 2, unk 3, `\\n` a piece of
its own, then `<loc0000>`..`<loc1023>` and `<seg000>`..`<seg127>` right after the text pieces;
`<image>` is the id after the last of those. `build_tokenizer(text_pieces=256000)` gives the exact
ids of the real PaliGemma tokenizer (loc tokens from 256000, `<image>` 257152).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np

from .files import atomic_file, atomic_folder, cache_root

DEMO_VERSION = 2
# what every surface says before answering with the demo checkpoint
DEMO_NOTE = "note: this is the demo checkpoint, a tiny model with random weights: its answers are random text"

_CORPUS = """\
a photo of a cat sitting on a mat in the sun
a dog runs across the green grass of a park
an astronaut in a white space suit holds a helmet and stands in front of a flag
a cup of coffee on a saucer with a spoon on a wooden table
a rocket on the launch pad with a tower beside it and clouds in the sky
two people ride bicycles down a city street past parked cars and shops
describe the image in detail
caption en
describe en
answer en what is in the image?
answer en how many people are there?
question en
detect cat ; dog ; person ; car ; rocket ; cup
segment cat ; person
ocr
the quick brown fox jumps over the lazy dog 0123456789
red blue green yellow black white orange purple pink brown grey
left right top bottom center front back above below near far
Ünïcödé text, accents é è à ü ö ñ and 中文 日本語 한국어 emoji 😀
"""


def build_tokenizer(path: str | os.PathLike, text_pieces: int | None = None) -> Path:
    """Train a small sentencepiece BPE model with Gemma's settings and PaliGemma's extra tokens.

    text_pieces: where the `<loc>` tokens start. None keeps the trained vocabulary (tiny); 256000
    pads with `<unusedN>` pieces to the real PaliGemma ids.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    lines = [line for line in _CORPUS.splitlines() if line] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=600,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        # Gemma's tokenizer: byte fallback, digits split, no dummy prefix, whitespace kept as is
        user_defined_symbols=["<mask>", "[@BOS@]", "\n", "\n\n"],
        byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    model = pb.ModelProto()
    model.ParseFromString(buf.getvalue())
    kind = pb.ModelProto.SentencePiece
    if text_pieces is not None:
        if text_pieces < len(model.pieces):
            raise ValueError(f"text_pieces must be at least {len(model.pieces)}")
        for i in range(text_pieces - len(model.pieces)):
            p = model.pieces.add()
            p.piece, p.score, p.type = f"<unused{i}>", 0.0, kind.UNUSED
    for name in [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]:
        p = model.pieces.add()
        p.piece, p.score, p.type = name, 0.0, kind.USER_DEFINED
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def demo_config(vocab_size: int, image_token_index: int) -> dict:
    """A PaliGemma 2 config.json at 224 px with the real structure and tiny widths."""
    text = {
        "model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "sliding_window": 4096, "max_position_embeddings": 8192,
        "layer_types": ["sliding_attention", "full_attention"], "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "patch_size": 14, "image_size": 224, "layer_norm_eps": 1e-6,
        "projection_dim": 64, "vision_use_head": False,
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "image_token_index": image_token_index, "projection_dim": 64, "hidden_size": 64,
        "vocab_size": vocab_size, "text_config": text, "vision_config": vision, "demo": True,
    }


def random_weights(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random tensors in the hub layout for any PaliGemma config dict (any size)."""
    from .checkpoint import expected_shapes
    from .config import PaliGemmaConfig

    cfg = PaliGemmaConfig.from_dict(config)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        out[hub_name(name)] = rng.normal(*init_rule(name, shape), shape).astype(dtype)
    return out


def init_rule(name: str, shape: tuple[int, ...], gain: float = 1.5) -> tuple[float, float]:
    """(mean, std) of the normal distribution a random weight is drawn from, by its canonical name.

    The one rule of the demo checkpoint, the full-size writer (gain 1) and the test fixtures:
    weights with enough spread that a random model's greedy choices are decisive (an init near
    zero, as transformers' is, gives near ties).
    """
    if name.startswith("text.") and name.endswith("norm.weight"):
        return 0.0, 0.1  # Gemma norms scale by (1 + w)
    if name.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
        return 1.0, 0.1
    if name.endswith("bias"):
        return 0.0, 0.02
    if name == "text.embed_tokens.weight":
        # small next to the layers' outputs: with a tied head, a dominant input embedding makes
        # a random model repeat its last token forever
        return 0.0, 0.3 / math.sqrt(shape[-1])
    if "position_embedding" in name:
        return 0.0, 1.0 / math.sqrt(shape[-1])
    return 0.0, gain / math.sqrt(math.prod(shape[1:]))


def hub_name(canonical: str) -> str:
    """Canonical name -> the name in the hub's checkpoints (what users download)."""
    for prefix, to in (
        ("vision.", "vision_tower.vision_model."),
        ("projector.", "multi_modal_projector.linear."),
        ("text.", "language_model.model."),
    ):
        if canonical.startswith(prefix):
            return to + canonical[len(prefix):]
    raise ValueError(canonical)


def demo_checkpoint() -> Path:
    """The demo checkpoint folder, generated on first use (atomically) and cached after."""
    folder = cache_root() / f"demo-v{DEMO_VERSION}"
    if (folder / "config.json").exists():
        return folder
    with atomic_folder(folder, replace=False) as tmp:  # a process that gets there first wins
        write_checkpoint(tmp, text_pieces=None, seed=0)
    return folder


def write_checkpoint(folder: Path, text_pieces: int | None, seed: int, config: dict | None = None) -> Path:
    """Tokenizer + config + random safetensors weights (hub layout) in `folder`."""
    from safetensors.numpy import save_file
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder / "tokenizer.model", text_pieces)
    real_vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    # the embedding is padded past `<image>` as in the real checkpoints (257152 -> 257216)
    config = config or demo_config(vocab_size=(real_vocab + 1 + 63) // 64 * 64, image_token_index=real_vocab)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder



DEMO_VAE_VERSION = 1


def demo_vae() -> Path:
    """The demo checkpoint's mask decoder: random weights laid out as big_vision's vae-oid.npz,
    marked `demo` in the file's metadata; written (atomically) on first use beside the demo folder
    (not in it: every safetensors file in a checkpoint folder is read as model weights)."""
    from safetensors.numpy import save_file

    from .vae import demo_weights

    path = cache_root() / f"demo-vae-v{DEMO_VAE_VERSION}.safetensors"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(demo_weights(seed=0), str(tmp), metadata={"demo": "true", "note": "random weights, not big_vision's decoder"})
    return path
