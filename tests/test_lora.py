"""Fine-tuning: PaliGemma's loss, LoRA gradients and adapters, checked against transformers and PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_paligemma as pg
from mlx_paligemma.adapter import LoraConfig, read_adapter
from mlx_paligemma.errors import SettingError

from .conftest import make_image

BACKENDS = ["torch", "mlx"]
ROWS = [("caption en", "a red square on grey"), ("answer en what is it?", "a cat"), ("detect cat", "<loc0100><loc0200><loc0900><loc1000> cat")]


def oracle_loss(oracle, images, prompts, suffixes) -> float:
    import torch

    proc = oracle.processor
    proc.tokenizer.padding_side = "right"  # transformers counts positions from the row's start
    inputs = proc(images=list(images), text=["<image>" + p for p in prompts], suffix=list(suffixes),
                  return_tensors="pt", padding="longest")
    with torch.no_grad():
        return float(oracle.model(**inputs).loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["pg2", "pg2_window", "pg1"])
def test_loss_equals_transformers(checkpoints, oracles, backend, name):
    model = pg.load(checkpoints[name].folder, backend=backend, dtype="float32")
    oracle = oracles(name)
    images = [make_image(i) for i in range(len(ROWS))]
    for image, (prompt, suffix) in zip(images, ROWS):
        assert abs(model.loss(image, prompt, suffix) - oracle_loss(oracle, [image], [prompt], [suffix])) < 1e-5
    prompts, suffixes = zip(*ROWS)
    got = model.loss_batch(images, prompts, suffixes)
    want = oracle_loss(oracle, images, prompts, suffixes)
    assert abs(got - want) < 1e-5


TARGET_RE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def nonzero_init(model, config, seed=1):
    """PEFT's initialisation, then B drawn at random too: with B = 0 the gradient of A would be 0."""
    from mlx_paligemma.adapter import init_weights
    from mlx_paligemma.checkpoint import expected_shapes

    shapes = expected_shapes(model.config)
    paths = config.module_paths(model.config.text.num_hidden_layers)
    weights = init_weights(config, {p: shapes[p + ".weight"] for p in paths}, seed)
    rng = np.random.default_rng(seed)
    for k in weights:
        if k.endswith("lora_B.weight"):
            weights[k] = rng.normal(0, 0.1, weights[k].shape).astype(np.float32)
    return weights


def peft_model(oracle_fixture, config, weights=None):
    import torch
    from peft import LoraConfig as PeftConfig, get_peft_model, set_peft_model_state_dict
    from transformers import PaliGemmaForConditionalGeneration

    from mlx_paligemma.adapter import peft_key

    base = PaliGemmaForConditionalGeneration.from_pretrained(oracle_fixture.folder, dtype=torch.float32, attn_implementation="eager")
    pm = get_peft_model(base, PeftConfig(r=config.r, lora_alpha=config.alpha, target_modules=TARGET_RE, lora_dropout=0.0))
    if weights is not None:
        result = set_peft_model_state_dict(pm, {peft_key(k): torch.from_numpy(v) for k, v in weights.items()})
        assert not result.unexpected_keys
    return pm


def peft_key_to_canonical(name: str) -> str:
    from mlx_paligemma.adapter import canonical_key

    return canonical_key(name.replace(".default.", "."))


@pytest.mark.parametrize("name", ["pg2", "pg1"])
def test_lora_gradients_equal_peft(checkpoints, oracles, name):
    """One batch of two rows, same base, same adapter weights: our gradients (torch, then MLX) are PEFT's."""
    from mlx_paligemma.training import make_batch

    config = LoraConfig(r=4, alpha=8.0)
    images = [make_image(7), make_image(8)]
    prompts, suffixes = ["caption en", "answer en what is it?"], ["a red square on grey", "a cat"]
    oracle = oracles(name)
    grads = {}
    for backend in BACKENDS:
        model = pg.load(checkpoints[name].folder, backend=backend, dtype="float32")
        weights = nonzero_init(model, config)
        model.backend.add_lora(config, weights)
        trainer = model.backend.trainer(lr=1e-3)
        batch = make_batch(model, images, prompts, suffixes)
        _, count = trainer.accumulate(batch)
        grads[backend] = {k: g / count for k, g in trainer.gradients().items()}  # of the mean, as transformers' loss

    pm = peft_model(checkpoints[name], config, weights)
    proc = oracle.processor
    proc.tokenizer.padding_side = "right"
    inputs = proc(images=images, text=["<image>" + p for p in prompts], suffix=suffixes, return_tensors="pt", padding="longest")
    pm(**inputs).loss.backward()
    want = {peft_key_to_canonical(n): p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    assert set(want) == set(grads["torch"]) == set(grads["mlx"]) and len(want) == 3 * 7 * 2
    for k, w in want.items():
        scale = float(np.abs(w).max())
        assert scale > 0, k
        for backend in BACKENDS:
            assert np.abs(grads[backend][k] - w).max() <= 1e-4 * scale + 1e-7, (backend, k)


def peft_logits(pm, oracle, image, prompt, suffix_ids):
    import torch

    inputs = oracle.inputs(image, prompt)
    ids = torch.cat([inputs["input_ids"], torch.tensor([suffix_ids])], dim=1)
    types = torch.cat([torch.zeros_like(inputs["input_ids"]), torch.ones(1, len(suffix_ids), dtype=torch.int64)], dim=1)
    with torch.no_grad():
        out = pm(input_ids=ids, pixel_values=inputs["pixel_values"], token_type_ids=types, attention_mask=torch.ones_like(ids))
    return out.logits[0].numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapters_cross_between_us_and_peft(checkpoints, oracles, tmp_path, backend):
    """Ours -> PEFT, PEFT -> ours, and a merged folder: the same logits each way."""
    import torch
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration

    from mlx_paligemma.adapter import merge
    from mlx_paligemma.training import Example, TrainSettings, train

    fixture, oracle = checkpoints["pg2"], oracles("pg2")
    image, prompt, suffix = make_image(3), "caption en", "a red square"

    # a few steps of training so that B is no longer zero, written as a checkpoint folder
    model = pg.load(fixture.folder, backend=backend, dtype="float32")
    config = LoraConfig(r=4, alpha=8.0, targets=("q", "v", "down"))
    model.add_lora(config)
    path = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(image).save(path)
    ours = tmp_path / "ours"
    train(model, config, [Example(str(path), prompt, suffix)], ours, TrainSettings(epochs=3, lr=1e-2), progress=False, log=lambda m: None)
    assert json.loads((ours / "adapter_config.json").read_text())["r"] == 4
    suffix_ids = model.tokenizer.encode(suffix)
    got = pg.load(fixture.folder, backend=backend, dtype="float32", adapter=ours).logits(image, prompt, suffix_ids)
    base_logits = pg.load(fixture.folder, backend=backend, dtype="float32").logits(image, prompt, suffix_ids)
    assert np.abs(got - base_logits).max() > 1e-2  # the adapter changes the model

    base = PaliGemmaForConditionalGeneration.from_pretrained(fixture.folder, dtype=torch.float32, attn_implementation="eager")
    theirs = peft_logits(PeftModel.from_pretrained(base, ours), oracle, image, prompt, suffix_ids)
    np.testing.assert_allclose(got, theirs, atol=2e-4, rtol=0)

    # saved by PEFT (random A and B) -> loaded here
    pm = peft_model(fixture, LoraConfig(r=2, alpha=4.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    want = peft_logits(pm, oracle, image, prompt, suffix_ids)
    loaded = pg.load(fixture.folder, backend=backend, dtype="float32", adapter=tmp_path / "peft")
    np.testing.assert_allclose(loaded.logits(image, prompt, suffix_ids), want, atol=2e-4, rtol=0)

    # merged into a plain folder: the adapter's logits without LoRA layers
    merge(fixture.folder, tmp_path / "peft", tmp_path / "merged")
    merged = pg.load(tmp_path / "merged", backend=backend, dtype="float32")
    np.testing.assert_allclose(merged.logits(image, prompt, suffix_ids), want, atol=2e-4, rtol=0)


@pytest.fixture
def one_torch_thread():
    """Tiny training steps on a shared 2-core machine: one thread is several times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# colour -> (RGB, box x0, y0, x1, y1): the box the model must learn to answer for that colour of square
SQUARES = {"red": ((220, 30, 30), (10, 8, 40, 30)), "green": ((30, 200, 40), (50, 30, 90, 70)),
           "blue": ((30, 40, 220), (20, 50, 70, 95))}


def square_examples(folder, seeds):
    """`detect square` rows: a coloured square on grey noise, its box (by colour) as the target."""
    from PIL import Image

    from mlx_paligemma.training import Example, detect_example

    folder.mkdir(exist_ok=True)
    rows = []
    for colour, (rgb, (x0, y0, x1, y1)) in SQUARES.items():
        for seed in seeds:
            rng = np.random.default_rng(seed)
            a = rng.integers(100, 156, (100, 100, 3))
            a[y0:y1, x0:x1] = np.array(rgb) + rng.integers(-20, 20, (y1 - y0, x1 - x0, 3))
            path = folder / f"{colour}-{seed}.png"
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path)
            prefix, suffix = detect_example([[x0, y0, x1 - x0, y1 - y0]], ["square"], 100, 100)
            rows.append(Example(str(path), prefix, suffix))
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_learns_a_task(checkpoints, tmp_path, backend, one_torch_thread):
    """200 steps on 12 images: the loss falls and greedy answers on 6 held-out images are the targets."""
    from mlx_paligemma.detection import parse_detections
    from mlx_paligemma.training import TrainSettings, train

    train_rows, held = square_examples(tmp_path / "img", range(4)), square_examples(tmp_path / "img", (100, 101))
    model = pg.load(checkpoints["pg2"].folder, backend=backend, dtype="float32")
    config = LoraConfig(r=8, alpha=16.0)
    model.add_lora(config)

    def held_out():
        loss = model.loss_batch([e.image for e in held], [e.prefix for e in held], [e.suffix for e in held])
        answers = [model.generate(e.image, e.prefix, max_tokens=12).text for e in held]
        return loss, sum(a == e.suffix for a, e in zip(answers, held)), answers

    before, matched_before, _ = held_out()
    state = train(model, config, train_rows, tmp_path / "adapter", TrainSettings(epochs=1000, max_steps=200, lr=1e-2, batch_size=3),
                  progress=False, log=lambda m: None)
    after, matched, answers = held_out()
    first, last = np.mean(state["losses"][:5]), np.mean(state["losses"][-5:])
    print(f"{backend}: train loss {first:.3f} -> {last:.3f}, held-out {before:.3f} -> {after:.3f}, exact {matched_before} -> {matched}/6")
    assert matched_before == 0 and matched == len(held), answers
    assert last < first - 1.5 and after < before - 1.5
    for e, a in zip(held, answers):
        box = SQUARES[e.image.rsplit("/", 1)[1].split("-")[0]][1]
        (det,) = parse_detections(a, (100, 100))
        assert det.label == "square" and np.abs(np.array(det.box) - box).max() <= 100 / 1024


def test_detect_suffix_round_trips_through_the_parser():
    """Every bin of every coordinate: COCO box -> loc tokens -> parse_detections -> the same tokens."""
    from mlx_paligemma.detection import parse_detections
    from mlx_paligemma.training import box_locs, detect_example

    for width, height in ((640, 480), (1023, 77), (1, 1), (4000, 3000)):
        bins = np.arange(1024)
        for b0, b1 in zip(bins, bins[::-1]):
            lo, hi = sorted((b0, b1))
            text = f"<loc{lo:04d}><loc{lo:04d}><loc{hi:04d}><loc{hi:04d}> cat"
            (det,) = parse_detections(text, (width, height))
            x0, y0, x1, y1 = det.box
            assert box_locs([x0, y0, x1 - x0, y1 - y0], width, height) + " cat" == text
    prefix, suffix = detect_example([[0, 0, 640, 480], [10, 20, 30, 40]], ["a cat", "dog"], 640, 480)
    assert prefix == "detect a cat ; dog"
    assert suffix == "<loc0000><loc0000><loc1023><loc1023> a cat ; <loc0043><loc0016><loc0128><loc0064> dog"


def test_finetune_command_resumes_exactly(checkpoints, tmp_path, monkeypatch, one_torch_thread):
    """Ctrl-C saves the last full step; --resume then ends where an uninterrupted run ends, to the last bit."""
    from mlx_paligemma import cli
    from mlx_paligemma.adapter import read_adapter

    rows = square_examples(tmp_path / "img", range(2))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"image": f"img/{e.image.rsplit('/', 1)[1]}", "prefix": e.prefix, "suffix": e.suffix}) + "\n" for e in rows))
    args = ["finetune", str(data), "--model", str(checkpoints["pg2"].folder), "--backend", "torch", "--dtype", "float32",
            "--rank", "4", "--targets", "q,v", "--epochs", "2", "--batch-size", "2", "--lr", "1e-2", "--val", str(data), "-q"]
    assert cli.main(args + ["-o", str(tmp_path / "whole")]) == 0
    state = json.loads((tmp_path / "whole" / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["val_losses"]) == 2 and state["val_losses"][1] < state["val_losses"][0]

    calls = {"n": 0}  # the interrupt comes from inside the loop, at the 5th optimizer step (mid-epoch)
    from mlx_paligemma.torch_backend import lora

    original = lora.TorchTrainer.update

    def interrupting(self, count):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        original(self, count)

    monkeypatch.setattr(lora.TorchTrainer, "update", interrupting)
    assert cli.main(args + ["-o", str(tmp_path / "cut")]) == 130
    cut = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())
    assert (cut["step"], cut["epoch"], cut["batch"]) == (4, 1, 1)
    assert cli.main(args + ["-o", str(tmp_path / "cut")]) == 2  # exists: --resume or --force
    monkeypatch.setattr(lora.TorchTrainer, "update", original)
    assert cli.main(args + ["-o", str(tmp_path / "cut"), "--resume"]) == 0
    (_, whole), (_, resumed) = read_adapter(tmp_path / "whole"), read_adapter(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    for k in whole:
        np.testing.assert_array_equal(whole[k], resumed[k])
    assert json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["losses"] == state["losses"]


def dequantized_into(quantized, plain) -> None:
    """Give `plain` (a float32 model) the dequantized weights of `quantized`: the same base, exactly."""
    if quantized.backend.name == "torch":
        import torch

        from mlx_paligemma.torch_backend.cpu_kernels import KernelEmbedding, KernelLinear
        from mlx_paligemma.torch_backend.quantize import QuantizedEmbedding, QuantizedLinear

        qmods = dict(quantized.backend.model.named_modules())
        copied = 0
        for path, m in plain.backend.model.named_modules():
            q = qmods.get(path)
            q = getattr(q, "base_layer", q)
            # on an x86 CPU without bf16 the int8 and int4 layers are our kernels' (int8 rows with a scale
            # each; int4 nibbles with a scale and a bias per group)
            if isinstance(q, KernelLinear) and q.qbias is not None:
                nibbles = torch.stack((q.weight & 15, q.weight >> 4), dim=-1).reshape(q.weight.shape[0], -1).double()
                N, G = q.scale.shape
                w = nibbles.reshape(N, G, -1) * q.scale.double()[..., None] + q.qbias.double()[..., None]
                with torch.no_grad():
                    m.weight.copy_(w.reshape(N, -1).float())
                copied += 1
                continue
            scales = getattr(q, "scales", None) if isinstance(q, (QuantizedLinear, QuantizedEmbedding, KernelEmbedding)) \
                else getattr(q, "scale", None) if isinstance(q, KernelLinear) else None
            if scales is not None:
                assert q.bits == 8 if isinstance(q, QuantizedLinear) else q.weight.dtype == torch.int8
                with torch.no_grad():
                    m.weight.copy_(q.weight.float() * scales.float()[:, None])
                copied += 1
        assert copied == 7 * quantized.config.text.num_hidden_layers + 1  # every adapted layer and the embedding
        return
    import mlx.core as mx
    import mlx.nn as nn

    qmods = dict(quantized.backend.model.named_modules())
    for path, m in plain.backend.model.named_modules():
        q = qmods.get(path)
        q = getattr(q, "base_layer", q)
        if isinstance(q, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits).astype(mx.float32)
            m.weight = w.T if getattr(m, "transposed", False) else w


@pytest.mark.parametrize("backend,bits", [("torch", 8), ("torch", 4), ("mlx", 8), ("mlx", 4)])
def test_qlora_gradients_are_those_of_the_dequantized_base(checkpoints, backend, bits):
    """LoRA over a quantized base: the same gradients as LoRA over a float32 copy of the dequantized weights.
    torch's 4-bit base trains where our CPU kernels run (x86, AVX2, no native bf16); elsewhere it refuses."""
    from mlx_paligemma.training import make_batch

    if backend == "torch" and bits == 4:
        from mlx_paligemma.torch_backend.backend import cpu_has_fast_bf16, cpu_kernels_available

        if cpu_has_fast_bf16() or not cpu_kernels_available():
            model = pg.load(checkpoints["pg2"].folder, backend="torch", dtype="float32", quantize=4, group_size=32)
            model.backend.add_lora(LoraConfig(r=4, alpha=8.0), nonzero_init(model, LoraConfig(r=4, alpha=8.0)))
            with pytest.raises(SettingError, match="4-bit base"):
                model.backend.trainer(lr=1e-3).accumulate(
                    make_batch(model, [make_image(1)], ["caption en"], ["a grey cat"]))
            return

    folder = checkpoints["pg2"].folder
    config = LoraConfig(r=4, alpha=8.0)
    quantized = pg.load(folder, backend=backend, dtype="float32", quantize=bits, group_size=32)
    plain = pg.load(folder, backend=backend, dtype="float32")
    dequantized_into(quantized, plain)
    weights = nonzero_init(plain, config)
    grads = []
    for model in (quantized, plain):
        model.backend.add_lora(config, weights)
        trainer = model.backend.trainer(lr=1e-3)
        trainer.accumulate(make_batch(model, [make_image(1)], ["caption en"], ["a grey cat"]))
        grads.append(trainer.gradients())
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 42
    for k, want in grads[1].items():
        assert np.abs(grads[0][k] - want).max() <= 1e-4 * np.abs(want).max() + 1e-7, k


def test_bad_inputs_give_one_line_errors(checkpoints, tmp_path, capsys):
    """Bad data, bad adapters and occupied outputs: exit code 2 and one `error:` line, nothing written."""
    from PIL import Image
    from safetensors.numpy import save_file

    from mlx_paligemma import cli
    from mlx_paligemma.adapter import init_weights, peft_key, write_adapter

    folder = str(checkpoints["pg2"].folder)
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    cases = {
        "missing.jsonl": None,
        "bad.jsonl": "{not json\n",
        "noimage.jsonl": json.dumps({"image": "nowhere.png", "prefix": "caption en", "suffix": "x"}) + "\n",
        "nosuffix.jsonl": json.dumps({"image": "a.png", "prefix": "caption en"}) + "\n",
        "empty.jsonl": "\n",
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert cli.main(["finetune", str(tmp_path / name), "-o", str(tmp_path / "out"), "--model", folder]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    (tmp_path / "ok.jsonl").write_text(json.dumps({"image": "a.png", "prefix": "caption en", "suffix": "x"}) + "\n")
    for extra in (["--rank", "0"], ["--targets", "q,proj"], ["--lr", "0"], ["--resume"]):
        assert cli.main(["finetune", str(tmp_path / "ok.jsonl"), "-o", str(tmp_path / "out"), "--model", folder, *extra]) == 2, extra
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()

    config = LoraConfig(r=2, targets=("q",))
    good = init_weights(config, {"text.layers.0.self_attn.q_proj": (64, 64)})
    write_adapter(tmp_path / "wide", config, {k: np.zeros((v.shape[0], 65) if "lora_A" in k else v.shape, np.float32) for k, v in good.items()})
    write_adapter(tmp_path / "vision", config, {k.replace("text.layers", "vision.encoder.layers"): v for k, v in good.items()})
    (tmp_path / "rank").mkdir()
    save_file({peft_key(k): v for k, v in good.items()}, str(tmp_path / "rank" / "adapter_model.safetensors"))
    (tmp_path / "rank" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (tmp_path / "dora").mkdir()
    save_file({peft_key(k): v for k, v in good.items()}, str(tmp_path / "dora" / "adapter_model.safetensors"))
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    for bad, words in (("wide", "does not fit"), ("vision", "only the text decoder"), ("rank", "rank"), ("dora", "use_dora"),
                       ("nothing", "adapter")):
        assert cli.main(["caption", str(tmp_path / "a.png"), "--model", folder, "--adapter", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, (bad, err)


def test_adapter_on_the_command_line_and_merge_command(checkpoints, tmp_path, capsys):
    """`--adapter` answers as pg.load(adapter=...) does; `paligemma merge` writes once, then wants --force."""
    from mlx_paligemma import cli
    from mlx_paligemma.adapter import write_adapter

    folder = checkpoints["pg2"].folder
    model = pg.load(folder, backend="torch", dtype="float32")
    config = LoraConfig(r=4, alpha=8.0)
    write_adapter(tmp_path / "ad", config, nonzero_init(model, config))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(make_image(5)).save(image)
    want = pg.load(folder, backend="torch", dtype="float32", adapter=tmp_path / "ad").generate(str(image), "caption en", max_tokens=8)
    plain = model.generate(str(image), "caption en", max_tokens=8)
    assert want.token_ids != plain.token_ids
    common = ["--model", str(folder), "--backend", "torch", "--dtype", "float32", "--max-tokens", "8", "--json"]
    assert cli.main(["caption", str(image), *common, "--adapter", str(tmp_path / "ad")]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids
    assert cli.main(["merge", str(folder), str(tmp_path / "ad"), "-o", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert cli.main(["caption", str(image), *common[2:], "--model", str(tmp_path / "merged")]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids
    assert cli.main(["merge", str(folder), str(tmp_path / "ad"), "-o", str(tmp_path / "merged")]) == 2
    assert "--force" in capsys.readouterr().err
