"""LoRA layers on the text decoder, PaliGemma's training loss and an AdamW trainer of the LoRA weights.

A LoRALinear keeps the layer it adapts (`base_layer`, frozen, possibly quantized) and adds
`scaling * lora_B(lora_A(dropout(x)))`, computed in float32 as PEFT does (the input cast to the
adapter's dtype, the sum cast back to the layer's output dtype).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..backend import Trainer, training_masks
from ..errors import SettingError


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, a: mx.array, b: mx.array, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False)
        self.lora_A.weight, self.lora_B.weight = a, b
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_layer(x)
        a = self.lora_A.weight
        x = x.astype(a.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # as PEFT: the base output plus the float32 update, then back to the base output's dtype
        return (y + self.lora_B(self.lora_A(x)) * self.scaling).astype(y.dtype)


def add_lora(model: nn.Module, config, weights: dict[str, np.ndarray]) -> None:
    """Replace each adapted layer of `model` (a PaliGemma) with a LoRALinear holding `weights`."""
    modules = dict(model.named_modules())
    for path in sorted({n.rsplit(".", 2)[0] for n in weights}):
        a = mx.array(np.ascontiguousarray(weights[f"{path}.lora_A.weight"], np.float32))
        b = mx.array(np.ascontiguousarray(weights[f"{path}.lora_B.weight"], np.float32))
        parent, _, child = path.rpartition(".")
        base = modules[path]
        if isinstance(base, LoRALinear):
            base = base.base_layer
        setattr(modules[parent], child, LoRALinear(base, a, b, config.scaling, config.dropout))
    mx.eval(model.parameters())


def lora_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: np.array(p.astype(mx.float32)) for n, p in tree_flatten(model.parameters())
            if ".lora_A." in n or ".lora_B." in n}


def loss_sums(backend, model: nn.Module, batch) -> tuple[mx.array, int]:
    """(summed cross-entropy of the batch's targets, their count): PaliGemma's training loss.

    Only positions with a target reach the output head: the logits of the whole vocabulary at
    every position would be most of a step's memory.
    """
    B, T = batch.input_ids.shape
    # the vision tower and projector are frozen
    features = mx.stop_gradient(model.image_features(mx.array(batch.pixels.transpose(0, 2, 3, 1)).astype(backend._dtype)))
    h = model.embed(mx.array(batch.input_ids), features, mx.zeros((B,), mx.int32))
    masks = training_masks(batch.prefix_lens, batch.lengths, T, backend.config.text.sliding_window)
    h = model.text(h, {k: mx.array(m) for k, m in masks.items()}, None, 0)
    flat = batch.targets.reshape(-1)
    where = np.nonzero(flat >= 0)[0]
    logits = model.text.logits(h.reshape(B * T, -1)[mx.array(where)]).astype(mx.float32)  # (n, vocab)
    return nn.losses.cross_entropy(logits, mx.array(flat[where]), reduction="sum"), len(where)


class MLXTrainer(Trainer):
    def __init__(self, backend, lr: float, weight_decay: float = 0.0):
        self.backend = backend
        model = backend.model
        model.freeze()
        found = False
        for _, module in model.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_A.unfreeze()
                module.lora_B.unfreeze()
                found = True
        if not found:
            raise SettingError("no LoRA layers to train (add_lora first)")
        # torch's AdamW: bias-corrected moments, decoupled weight decay
        self.optimizer = optim.AdamW(learning_rate=lr, weight_decay=weight_decay, bias_correction=True)
        self.optimizer.init(model.trainable_parameters())
        self._grad_fn = nn.value_and_grad(model, lambda batch: loss_sums(backend, model, batch))
        self.grads = None

    def accumulate(self, batch) -> tuple[float, int]:
        self.backend.model.train()  # LoRA dropout on
        (loss, n), grads = self._grad_fn(batch)
        self.grads = grads if self.grads is None else tree_map(mx.add, self.grads, grads)
        mx.eval(loss, self.grads)
        return float(loss), n

    def update(self, count: int) -> None:
        grads = tree_map(lambda g: g / max(count, 1), self.grads)
        self.optimizer.update(self.backend.model, grads)
        mx.eval(self.backend.model.trainable_parameters(), self.optimizer.state)
        self.grads = None
        self.backend.recompile()

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: np.array(g.astype(mx.float32)) for n, g in tree_flatten(self.grads or {})}

    def state(self) -> dict[str, np.ndarray]:
        out = {n: np.array(v.astype(mx.float32)) for n, v in tree_flatten(self.optimizer.state) if n.endswith((".m", ".v"))}
        out["step"] = np.array(float(self.optimizer.state["step"]), np.float32)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "step" not in state:
            return
        moments = [(n, mx.array(v)) for n, v in state.items() if n != "step"]
        self.optimizer.state.update(tree_unflatten(moments))
        self.optimizer.state["step"] = mx.array(int(state["step"]), mx.uint64)
