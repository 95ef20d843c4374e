"""Benchmark: our backends side by side with transformers and mlx-vlm, each engine in its own process.

    paligemma bench                                  # 3B-224, bf16 engines, 3 runs each
    paligemma bench --engines ours-torch-bfloat16,transformers-bfloat16 --runs 5
    paligemma bench --config 3b-224 --layers 4 --engines ours-mlx-float32,mlx-vlm-float32
    paligemma bench --batch 1,4,8 --engines ours-torch-bfloat16
    paligemma bench --train --engines ours-torch-bfloat16,ours-mlx-int4,transformers-bfloat16
    paligemma bench --profile --engines ours-torch-bfloat16,transformers-bfloat16 --runs 1

A full-size random-weight checkpoint (hub layout, bf16) is written once and cached. Generation
length is forced (eos ignored) so that every engine does the same work: a prompt on one image,
then 64 new tokens. Every engine is loaded, generates WARMUP_TOKENS once, then is timed on one
generation: time to first token (from the call, image and prompt in hand) and decode rate from
that same generation (transformers through a streamer), peak resident memory during it (Linux:
VmHWM reset before it). Reported per engine, median and spread over the runs, with load and
vision times; plus the memory bandwidth measured on the spot and the decode ceiling it implies,
and our engines against transformers at its best (the faster of float32 and bfloat16; SigLIP on
SDPA; the quantized ones too: torchao int8 weight-only `transformers-int8`, bitsandbytes
`transformers-bnb8`).
`--train` times LoRA training steps instead (r 8 on q,k,v,o,gate,up,down, AdamW), each engine on
the same row (one image, `caption en`, TRAIN_SUFFIX): forward, backward and optimizer step, after
one warm-up step; transformers runs with PEFT (`get_peft_model`) on the same base.
`--profile` adds, for the engines on torch, one more first token under torch's profiler after the
timed generation: its wall time, the time inside PyTorch's ops (the rest: our kernels, Python) and
the ops that took most of it, so that a run on a new kind of CPU shows where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..backend import peak_rss_bytes, reset_peak_rss
from ..config import PaliGemmaConfig
from ..hardware import cpu_info

PROMPT = "caption en"
DEFAULT_ENGINES = "ours-torch-bfloat16,ours-torch-int8,transformers-float32,transformers-bfloat16,transformers-int8"
ENGINE_KINDS = ("ours-torch", "ours-mlx", "transformers", "mlx-vlm")
VARIANTS = ("float32", "bfloat16", "float16", "int8", "int4", "bnb8")  # bnb8: transformers + bitsandbytes
TRAIN_SUFFIX = "an astronaut in a white suit stands on the moon beside a flag, the earth low in a black sky"
LORA_RANK, LORA_ALPHA = 8, 16.0


def bench_image(name: str = "astronaut.jpg") -> np.ndarray:
    """An example photo (a smooth random picture when the examples are not at hand)."""
    from PIL import Image

    path = Path(__file__).resolve().parents[2] / "examples" / "images" / name
    if path.exists():
        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((512, 384)))


def parse_engine(name: str) -> tuple[str, str]:
    kind, _, variant = name.rpartition("-")
    if kind not in ENGINE_KINDS or variant not in VARIANTS:
        raise ValueError(f"unknown engine {name!r}: use KIND-VARIANT with KIND in {ENGINE_KINDS} and VARIANT in {VARIANTS}")
    return kind, variant


# --- workers: one engine, one process, one JSON line on stdout -------------------------------

WARMUP_TOKENS = 2  # every engine generates this much once before it is timed, on the same image and prompt


def first_token_profile(generate, top: int = 12) -> dict:
    """One first token under torch's profiler: wall seconds, seconds inside PyTorch's ops (self time
    summed: work outside them, our kernels and Python, is the difference) and the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        generate()
        wall = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"wall_s": wall, "torch_ops_s": sum(e.self_cpu_time_total for e in ops) / 1e6,
            "top": [[e.key, round(e.self_cpu_time_total / 1e3, 1), e.count] for e in ops[:top]]}


def worker_ours(kind: str, variant: str, folder: Path, tokens: int, batch: int, profiled: bool = False) -> dict:
    import mlx_paligemma as pg
    from mlx_paligemma.processor import pixel_values

    backend = "torch" if kind == "ours-torch" else "mlx"
    quantize = {"int8": 8, "int4": 4}.get(variant)
    dtype = "bfloat16" if quantize else variant
    t0 = time.perf_counter()
    model = pg.load(folder, backend=backend, dtype=dtype, quantize=quantize)
    load_s = time.perf_counter() - t0
    image = bench_image()
    pixels, _ = pixel_values([image], model.config.image_size)
    t0 = time.perf_counter()
    feats = model.backend.image_features(pixels)
    _sync(model.backend, feats)
    vision_s = time.perf_counter() - t0
    if batch:  # batch mode (also for a batch of 1, so that its row reads like the others)
        images = [np.ascontiguousarray(np.roll(image, 7 * i, axis=1)) for i in range(batch)]
        model.generate_batch(images, [PROMPT] * batch, max_tokens=WARMUP_TOKENS, min_tokens=WARMUP_TOKENS)
        model._features.clear()  # the timed run starts cold
        reset_peak_rss()
        t0 = time.perf_counter()
        outs = model.generate_batch(images, [PROMPT] * batch, max_tokens=tokens, min_tokens=tokens)
        total = time.perf_counter() - t0
        s = outs[0].stats
        return {"load_s": load_s, "vision_s": vision_s, "batch": batch, "ttft_s": total - (s.total_s - s.ttft_s),
                "aggregate_tokens_per_s": batch * (tokens - 1) / (s.total_s - s.ttft_s),
                "total_s": total, "peak_rss_bytes": peak_rss_bytes()}
    model.generate(image, PROMPT, max_tokens=WARMUP_TOKENS, min_tokens=WARMUP_TOKENS)
    model._features.clear()  # the timed run starts cold
    reset_peak_rss()
    t0 = time.perf_counter()
    out = model.generate(image, PROMPT, max_tokens=tokens, min_tokens=tokens)
    total = time.perf_counter() - t0
    peak = peak_rss_bytes()
    again = model.generate(image, PROMPT, max_tokens=1, min_tokens=1)  # same image: features cached
    s = out.stats
    # first token timed from the call, as for the other engines: the whole wall time less the decoding after it
    result = {"load_s": load_s, "vision_s": vision_s, "ttft_s": total - (s.total_s - s.ttft_s),
              "ttft_repeat_s": again.stats.ttft_s, "decode_tokens_per_s": s.decode_tokens_per_s,
              "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens, "peak_rss_bytes": peak,
              "device": s.device}
    if profiled and backend == "torch":
        model._features.clear()
        result["profile"] = first_token_profile(lambda: model.generate(image, PROMPT, max_tokens=1, min_tokens=1))
    return result


def _sync(backend, x) -> None:
    if backend.name == "mlx":
        import mlx.core as mx

        mx.eval(x)
    elif "cuda" in backend.device:
        import torch

        torch.cuda.synchronize()


def hf_processor(folder: Path, config: PaliGemmaConfig):
    """transformers' PaliGemmaProcessor for a checkpoint folder (its PIL image processor, our tokenizer.model)."""
    from transformers import AutoTokenizer, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    size = config.image_size
    ip = SiglipImageProcessorPil(size={"height": size, "width": size})
    ip.image_seq_length = config.num_image_tokens
    return PaliGemmaProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(folder))


def never_generated(config: PaliGemmaConfig) -> list[int]:
    """`<image>` and the embedding's padding rows after it: ids the other engines must be kept from."""
    return list(range(config.image_token_index, config.text.vocab_size))


class TokenClock:
    """A transformers streamer that notes when each batch of ids arrives (the prompt first, then each token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_model(variant: str, folder: Path):
    """transformers at its best on the CPU: SigLIP on SDPA (Gemma 2's softcap needs eager attention,
    Gemma 1 takes SDPA too); int8 is torchao's weight-only int8, bnb8 bitsandbytes' 8-bit."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    text_attn = "eager" if PaliGemmaConfig.from_file(folder / "config.json").text.is_gemma2 else "sdpa"
    kw = dict(attn_implementation={"": "sdpa", "vision_config": "sdpa", "text_config": text_attn})
    if variant == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        kw.update(dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu")
    elif variant == "bnb8":
        from transformers import BitsAndBytesConfig

        kw.update(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    else:
        kw.update(dtype=getattr(torch, variant))
    return PaliGemmaForConditionalGeneration.from_pretrained(folder, **kw).eval()


def worker_transformers(variant: str, folder: Path, tokens: int, profiled: bool = False) -> dict:
    import torch

    t0 = time.perf_counter()
    model = transformers_model(variant, folder)
    load_s = time.perf_counter() - t0
    config = PaliGemmaConfig.from_file(folder / "config.json")
    processor = hf_processor(folder, config)
    image = bench_image()
    kw = dict(do_sample=False, suppress_tokens=never_generated(config))
    dtype = torch.float32 if variant == "float32" else torch.bfloat16

    def run(n: int, clock=None):
        inputs = processor(images=image, text="<image>" + PROMPT, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, streamer=clock, **kw)
        return int(inputs["input_ids"].shape[1])

    with torch.inference_mode():
        pixels = processor(images=image, text="<image>" + PROMPT, return_tensors="pt")["pixel_values"].to(dtype)
        t0 = time.perf_counter()
        model.get_image_features(pixels)
        vision_s = time.perf_counter() - t0
        run(WARMUP_TOKENS)
        reset_peak_rss()
        clock = TokenClock()
        t0 = time.perf_counter()
        prompt_tokens = run(tokens, clock)
        peak = peak_rss_bytes()
        profile = first_token_profile(lambda: run(1)) if profiled else None
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt, put before the first forward
    generated = len(clock.times) - 1
    result = {"load_s": load_s, "vision_s": vision_s, "ttft_s": first - t0,
              "decode_tokens_per_s": (generated - 1) / max(last - first, 1e-9),
              "prompt_tokens": prompt_tokens, "generated_tokens": generated,
              "peak_rss_bytes": peak, "device": "cpu"}
    if profile:
        result["profile"] = profile
    return result


def worker_mlx_vlm(variant: str, folder: Path, tokens: int) -> dict:
    import mlx.core as mx
    from mlx_vlm import load
    from mlx_vlm.generate import stream_generate

    config = PaliGemmaConfig.from_file(folder / "config.json")
    hf_processor(folder, config).save_pretrained(folder)  # mlx-vlm reads the processor files
    t0 = time.perf_counter()
    model, processor = load(str(folder))
    if variant != "bfloat16":
        model.set_dtype(getattr(mx, variant))
    load_s = time.perf_counter() - t0  # mlx-vlm loads lazily: part of its load is in its first token
    from PIL import Image

    image = Image.fromarray(bench_image())

    def run(n: int) -> list[float]:
        times = []
        for _ in stream_generate(model, processor, "<image>" + PROMPT, image=[image], max_tokens=n,
                                 temperature=0.0, logits_processors=[_forced_length(config)]):
            times.append(time.perf_counter())
        return times

    run(WARMUP_TOKENS)
    reset_peak_rss()
    t0 = time.perf_counter()
    times = run(tokens)
    n = len(times)
    return {"load_s": load_s, "vision_s": float("nan"), "ttft_s": times[0] - t0,
            "decode_tokens_per_s": (n - 1) / max(times[-1] - times[0], 1e-9), "generated_tokens": n,
            "peak_rss_bytes": peak_rss_bytes(), "device": str(mx.default_device())}


def _forced_length(config: PaliGemmaConfig):
    """An mlx-vlm logits processor that never picks eos (the generation length is forced) nor a non-token."""
    import mlx.core as mx

    banned = list(config.eos_token_ids) + never_generated(config)

    def processor(tokens, logits):
        mask = mx.zeros(logits.shape[-1], dtype=mx.bool_)
        mask[mx.array(banned)] = True
        return mx.where(mask, -mx.inf, logits)

    return processor


def worker_train_ours(kind: str, variant: str, folder: Path, steps: int) -> dict:
    import mlx_paligemma as pg
    from mlx_paligemma.adapter import LoraConfig
    from mlx_paligemma.training import make_batch

    backend = "torch" if kind == "ours-torch" else "mlx"
    quantize = {"int8": 8, "int4": 4}.get(variant)
    model = pg.load(folder, backend=backend, dtype="bfloat16" if quantize else variant, quantize=quantize)
    model.add_lora(LoraConfig(r=LORA_RANK, alpha=LORA_ALPHA))
    trainer = model.backend.trainer(lr=1e-4)
    batch = make_batch(model, [bench_image()], [PROMPT], [TRAIN_SUFFIX])

    def step():
        loss, n = trainer.accumulate(batch)
        trainer.update(n)
        return loss / n

    return _train_steps(step, steps, batch.n_tokens, int(batch.n_targets))


def worker_train_transformers(variant: str, folder: Path, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    if variant not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"--train: transformers-{variant} is not a training engine here (use float32 or bfloat16)")
    model = transformers_model(variant, folder)  # as for generation: SigLIP on SDPA, Gemma 2 eager
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets))
    model.train()
    config = PaliGemmaConfig.from_file(folder / "config.json")
    inputs = hf_processor(folder, config)(images=bench_image(), text="<image>" + PROMPT, suffix=TRAIN_SUFFIX, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return _train_steps(step, steps, int(inputs["input_ids"].numel()), int((inputs["labels"] != -100).sum()))


def _train_steps(step, steps: int, tokens: int, targets: int) -> dict:
    t0 = time.perf_counter()
    first = step()  # warm-up: kernels, allocator, optimizer state
    warm_up_s = time.perf_counter() - t0
    process_peak = peak_rss_bytes()  # load and warm-up step
    # a line for whoever watches a long run (the parent reads only the RESULT line)
    print(f"warm-up step {warm_up_s:.1f} s, loss {first:.4f}, peak RSS so far {process_peak / 1e9:.2f} GB", flush=True)
    reset_peak_rss()  # the peak reported is that of the timed steps (weights, optimizer state, activations)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        last = step()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"step_s": s, "tokens_per_s": tokens / s, "tokens": tokens, "targets": targets, "first_loss": first,
            "last_loss": last, "peak_rss_bytes": peak_rss_bytes(), "peak_rss_load_and_warm_up_bytes": process_peak,
            "warm_up_step_s": warm_up_s}


def worker(args) -> int:
    kind, variant = parse_engine(args.worker)
    folder = Path(args.folder)
    if args.train_steps:
        if kind == "transformers":
            result = worker_train_transformers(variant, folder, args.train_steps)
        elif kind in ("ours-torch", "ours-mlx"):
            result = worker_train_ours(kind, variant, folder, args.train_steps)
        else:
            raise SystemExit(f"--train: {kind} has no training mode")
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if kind in ("ours-torch", "ours-mlx"):
        result = worker_ours(kind, variant, folder, args.tokens, args.batch_size, args.profile)
    elif kind == "transformers":
        result = worker_transformers(variant, folder, args.tokens, args.profile)
    else:
        result = worker_mlx_vlm(variant, folder, args.tokens)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- the parent: checkpoint, hardware ceiling, runs, table --------------------------------

def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: the best of a few full passes summing a large buffer (all cores, via torch if present)."""
    try:
        import torch

        x = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32)
        x.sum()
        best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    except ImportError:
        x = np.ones(size_mb * 1024 * 1024 // 4, dtype=np.float32)
        x.sum()
        best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return size_mb * 1024 * 1024 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_bytes_per_token(config, variant: str) -> float:
    """Bytes of weights read per decoded token: the text decoder's weights plus the tied output head."""
    t = config.text
    per_layer = (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim * t.hidden_size \
        + 3 * t.hidden_size * t.intermediate_size
    head = t.vocab_size * t.hidden_size
    per_weight = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "bnb8": 1, "int4": 0.5}[variant]
    head_bytes = head * (1 if variant in ("int8", "int4") else per_weight)  # our quantized head is int8
    return per_layer * t.num_hidden_layers * per_weight + head_bytes


def run_engine(engine: str, folder: Path, tokens: int, batch: int, env: dict, train_steps: int = 0,
               profiled: bool = False) -> dict:
    cmd = [sys.executable, "-m", "mlx_paligemma.dev.bench", "--worker", engine, "--folder", str(folder),
           "--tokens", str(tokens), "--batch-size", str(batch), "--train-steps", str(train_steps)]
    if profiled:
        cmd.append("--profile")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            # the 1-minute load average before and after: other jobs on the machine slow every figure
            return dict(json.loads(line[len("RESULT "):]), load_before=load_before, load_after=load_after)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:300]}


def add_ratio_to_single(batch: list[dict], single: list[dict]) -> None:
    """Each batch run's aggregate tokens/s over the single stream's of the same round."""
    for r, one in zip(batch, single):
        if "error" not in r and "error" not in one and one.get("aggregate_tokens_per_s"):
            r["ratio_to_single"] = r["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]


def summarise(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[-1]["error"], "runs": 0}
    out = {"runs": len(ok)}
    for key in ok[0]:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        else:
            out[key] = ok[0][key]
    return out


def _fmt(entry: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    v = entry.get(key)
    if not isinstance(v, dict) or v["median"] != v["median"]:
        return "-"
    m, lo, hi = v["median"] * scale, v["min"] * scale, v["max"] * scale
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _median(entry: dict, key: str) -> float | None:
    v = entry.get(key)
    return v["median"] if isinstance(v, dict) and v["median"] == v["median"] else None


def headline(summary: dict[str, dict]) -> list[str]:
    """Each of our engines against transformers at its best: for each figure the faster of its float32
    and bfloat16 runs (and, for our quantized engines, also its quantized runs)."""
    def best(engines, key, higher):
        found = [(_median(summary[e], key), e) for e in engines if _median(summary[e], key) is not None]
        return (max if higher else min)(found) if found else None

    ok = [e for e in summary if "error" not in summary[e]]
    plain = [e for e in ok if e in ("transformers-float32", "transformers-bfloat16")]
    quantized = [e for e in ok if e.startswith("transformers-") and e not in plain]
    lines = []
    for e in ok:
        if not e.startswith("ours-"):
            continue
        for rivals, label in ((plain, "transformers float"), (quantized if "int" in e else [], "transformers quantized")):
            decode, first = best(rivals, "decode_tokens_per_s", True), best(rivals, "ttft_s", False)
            mine_decode, mine_first = _median(summary[e], "decode_tokens_per_s"), _median(summary[e], "ttft_s")
            if decode and mine_decode:
                lines.append(f"{e}: decode {mine_decode / decode[0]:.2f}x {decode[1]} (the faster {label})")
            if first and mine_first:
                lines.append(f"{e}: first token {mine_first / first[0]:.2f}x the time of {first[1]} (the faster {label})")
    return lines


def table(summary: dict[str, dict], batch_mode: bool, train: bool = False) -> str:
    if train:
        head = "| engine | training step s | tokens/s | loss, first -> last step | peak RSS GB |\n|---|---|---|---|---|\n"
        rows = [f"| {e} | {_fmt(s, 'step_s')} | {_fmt(s, 'tokens_per_s', digits=1)} | "
                f"{_fmt(s, 'first_loss')} -> {_fmt(s, 'last_loss')} | {_fmt(s, 'peak_rss_bytes', 1e-9)} |"
                if "error" not in s else f"| {e} | error: {s['error']} ||||" for e, s in summary.items()]
        return head + "\n".join(rows)
    if batch_mode:
        head = ("| engine | batch | aggregate tokens/s | x single stream, same round | time to first token s | peak RSS GB, this generation |\n"
                "|---|---|---|---|---|---|\n")
        rows = [f"| {e} | {s.get('batch', {}).get('median', '-') if isinstance(s.get('batch'), dict) else '-'} | "
                f"{_fmt(s, 'aggregate_tokens_per_s')} | {_fmt(s, 'ratio_to_single')} | {_fmt(s, 'ttft_s')} | "
                f"{_fmt(s, 'peak_rss_bytes', 1e-9)} |"
                if "error" not in s else f"| {e} | error: {s['error']} ||||" for e, s in summary.items()]
        return head + "\n".join(rows)
    head = ("| engine | load s | vision s | first token s | first token, same image again s | decode tokens/s | peak RSS GB, this generation |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = []
    for e, s in summary.items():
        if "error" in s:
            rows.append(f"| {e} | error: {s['error']} ||||||")
            continue
        rows.append(f"| {e} | {_fmt(s, 'load_s', digits=1)} | {_fmt(s, 'vision_s')} | {_fmt(s, 'ttft_s')} | "
                    f"{_fmt(s, 'ttft_repeat_s')} | {_fmt(s, 'decode_tokens_per_s')} | {_fmt(s, 'peak_rss_bytes', 1e-9)} |")
    return head + "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="paligemma bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="3b-224", help="3b-224 (default), 3b-448, 10b-224, 28b-896, pg1-3b-224, ...")
    ap.add_argument("--layers", type=int, default=None, help="cut the text model to N layers (quick runs)")
    ap.add_argument("--engines", default=DEFAULT_ENGINES,
                    help=f"comma-separated KIND-VARIANT, KIND in {', '.join(ENGINE_KINDS)}, VARIANT in {', '.join(VARIANTS)}")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", default=None, help="batch mode: comma-separated batch sizes, e.g. 1,4,8")
    ap.add_argument("--json", default="bench_out/bench.json", help="where to write the results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--train", action="store_true", help="time LoRA training steps (see above) instead of generation")
    ap.add_argument("--train-steps", type=int, default=0, help="timed training steps per run, after a warm-up step (--train: default 2)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one first token of each torch engine (wall, PyTorch ops, top ops)")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.train and not args.train_steps:
        args.train_steps = 2

    from .fullsize import full_size_checkpoint

    try:
        engines = [e for e in args.engines.split(",") if e]
        for e in engines:
            parse_engine(e)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint: random {args.config}" + (f", {args.layers} text layers" if args.layers else ""), file=sys.stderr)
    folder = full_size_checkpoint(args.config, args.layers, progress=None)
    config = PaliGemmaConfig.from_file(folder / "config.json")
    bandwidth = memory_bandwidth_gbs()
    env = dict(os.environ)
    sizes = [int(b) for b in args.batch.split(",")] if args.batch else [0]
    summary, raw = {}, {}
    # every (engine, batch size) pair once a round, the order reversed every other round: a batch and
    # the single stream it is compared with run minutes apart, not a whole series apart
    pairs = [(e, b) for b in sizes for e in engines]
    results: dict[tuple, list] = {p: [] for p in pairs}
    for run in range(args.runs):
        for e, b in (pairs if run % 2 == 0 else pairs[::-1]):
            print(f"run {run + 1}/{args.runs}: {e}" + (f" batch {b}" if args.batch else ""), file=sys.stderr)
            results[e, b].append(run_engine(e, folder, args.tokens, b, env, args.train_steps if args.train else 0,
                                            args.profile and not args.batch and not args.train))
    for e, b in pairs:
        if 1 in sizes and b != 1:
            add_ratio_to_single(results[e, b], results[e, 1])
        key = f"{e} x{b}" if args.batch else e
        summary[key], raw[key] = summarise(results[e, b]), results[e, b]
    ceilings = {e: bandwidth * 1e9 / decode_bytes_per_token(config, parse_engine(e)[1]) for e in engines}
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine_description(), "config": args.config,
        "layers": args.layers, "tokens": args.tokens, "prompt": PROMPT,
        "train": {"steps": args.train_steps, "suffix": TRAIN_SUFFIX, "rank": LORA_RANK, "alpha": LORA_ALPHA} if args.train else None,
        "memory_read_gb_s": bandwidth, "decode_ceiling_tokens_per_s": ceilings,
        "summary": summary, "runs": raw,
        "command": "paligemma bench " + " ".join(a for a in (argv or sys.argv[1:])),
    }
    print(table(summary, bool(args.batch), args.train))
    if not args.batch and not args.train:
        report["headline"] = headline(summary)
        print("\n" + "\n".join(report["headline"]))
    profiles = profile_lines(raw)
    if profiles:
        print("\n" + "\n".join(profiles))
    if not args.train:
        print(f"\nmemory read bandwidth {bandwidth:.1f} GB/s; decode ceiling (weights read per token / bandwidth): "
              + ", ".join(f"{e} {c:.1f} tokens/s" for e, c in ceilings.items()))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"results written to {out}", file=sys.stderr)
    return 0


def profile_lines(raw: dict[str, list]) -> list[str]:
    """Each profiled engine's last run: where its first token's time went."""
    lines = []
    for e, runs in raw.items():
        p = next((r["profile"] for r in reversed(runs) if r.get("profile")), None)
        if p:
            lines.append(f"{e}: profiled first token {p['wall_s']:.2f} s, {p['torch_ops_s']:.2f} s in PyTorch's ops; top: "
                         + ", ".join(f"{name} {ms:.0f} ms x{n}" for name, ms, n in p["top"]))
    return lines


def machine_description() -> str:
    """The CPU as benchmark figures name it: model name, family and model numbers, the flags that
    choose our code paths (and those it lacks), cores and memory."""
    cpu = cpu_info()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "bf16")
    if cpu.flags:
        kind = ", ".join(f for f in wanted if f in cpu.flags)
        kind += "; no " + ", ".join(f for f in wanted[2:] if f not in cpu.flags) if any(f not in cpu.flags for f in wanted[2:]) else ""
    else:
        kind = "flags unknown"
    family = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    name = cpu.name + (f" family {family[0]} model {family[1]}" if all(family) else "")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return f"{platform.system()} {platform.machine()}, {name} ({kind}), {os.cpu_count()} cores, {mem:.0f} GiB"


def _cpuinfo_field(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, value = line.partition(":")
            if k.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
