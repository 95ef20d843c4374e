"""Parity on a full-size random PaliGemma checkpoint (default PaliGemma 2 3B-224), float32.

Each engine runs in its own process (a 3B model in float32 is 12 GB):
    python scripts/parity_full.py oracle            # transformers: reference logits and 32 greedy ids
    python scripts/parity_full.py mlx               # ours, compared with the reference
    python scripts/parity_full.py torch
On Linux the mlx CPU wheel multiplies with a reference BLAS; preload an OpenBLAS for mlx runs:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/parity_full.py mlx
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mlx_paligemma.config import PaliGemmaConfig
from mlx_paligemma.dev.bench import bench_image, hf_processor, never_generated
from mlx_paligemma.dev.fullsize import full_size_checkpoint

PROMPT = "caption en"
TOKENS = 32


def image() -> np.ndarray:
    return bench_image("chelsea.jpg")


def oracle(folder: Path, out: Path) -> None:
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0
    config = PaliGemmaConfig.from_file(folder / "config.json")
    processor = hf_processor(folder, config)
    inputs = processor(images=image(), text="<image>" + PROMPT, return_tensors="pt")
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(**inputs).logits[0].float().numpy()
        fwd_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                             suppress_tokens=never_generated(config))[0, inputs["input_ids"].shape[1]:].tolist()
        gen_s = time.perf_counter() - t0
    np.savez(out, logits=logits, ids=np.array(ids), input_ids=inputs["input_ids"][0].numpy(),
             pixels=inputs["pixel_values"][0].numpy())
    print(json.dumps({"engine": "transformers", "load_s": load_s, "forward_s": fwd_s, "generate_s": gen_s,
                      "prefix_tokens": int(inputs["input_ids"].shape[1]), "ids": ids}))


def ours(folder: Path, ref_path: Path, backend: str) -> int:
    import mlx_paligemma as pg
    from mlx_paligemma.processor import pixel_values

    ref = np.load(ref_path)
    t0 = time.perf_counter()
    model = pg.load(folder, backend=backend, dtype="float32")
    load_s = time.perf_counter() - t0
    pixels, _ = pixel_values([image()], model.config.image_size)
    ids = model.prompt_ids(PROMPT)
    t0 = time.perf_counter()
    logits = model.logits(image(), PROMPT)
    fwd_s = time.perf_counter() - t0
    out = model.generate(image(), PROMPT, max_tokens=TOKENS, min_tokens=TOKENS)
    rng = float(ref["logits"].max() - ref["logits"].min())
    result = {
        "engine": f"ours-{backend}", "load_s": load_s, "forward_s": fwd_s,
        "pixels_max_abs_diff": float(np.abs(pixels[0] - ref["pixels"]).max()),
        "ids_equal": ids == ref["input_ids"].tolist(),
        "logits_max_abs_diff": float(np.abs(logits - ref["logits"]).max()),
        "logits_range": rng,
        "logits_rel_diff": float(np.abs(logits - ref["logits"]).max() / rng),
        "greedy_equal": out.token_ids == ref["ids"].tolist(),
        "greedy_first_mismatch": next((i for i, (a, b) in enumerate(zip(out.token_ids, ref["ids"])) if a != b), None),
        "stats": out.stats.to_dict(),
    }
    print(json.dumps(result))
    ok = result["ids_equal"] and result["pixels_max_abs_diff"] <= 1e-5 and result["logits_rel_diff"] <= 1e-4 and result["greedy_equal"]
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=["oracle", "mlx", "torch"])
    ap.add_argument("--config", default="3b-224")
    ap.add_argument("--ref", default=None, help="reference .npz (default: next to the checkpoint)")
    args = ap.parse_args()
    folder = full_size_checkpoint(args.config, progress=None)
    ref = Path(args.ref) if args.ref else folder / "reference.npz"
    if args.engine == "oracle":
        oracle(folder, ref)
        return 0
    return ours(folder, ref, args.engine)


if __name__ == "__main__":
    sys.exit(main())
