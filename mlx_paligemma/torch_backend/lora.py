"""LoRA layers on the text decoder, PaliGemma's training loss and an AdamW trainer of the LoRA weights.

A LoRALinear keeps the layer it adapts (`base_layer`, frozen, possibly quantized) and adds
`scaling * lora_B(lora_A(dropout(x)))`, computed in float32 as PEFT does (the input cast to the
adapter's dtype, the sum cast back to the layer's output dtype).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backend import Trainer, training_masks
from ..errors import SettingError


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device, dtype=a.dtype)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device, dtype=b.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a = self.lora_A.weight
        # as PEFT: the base output plus the float32 update, then back to the base output's dtype
        return (y + self.lora_B(self.lora_A(self.dropout(x.to(a.dtype)))) * self.scaling).to(y.dtype)


def add_lora(model: nn.Module, config, weights: dict[str, np.ndarray]) -> None:
    """Replace each adapted layer of `model` (a PaliGemma) with a LoRALinear holding `weights`."""
    device = next(model.text.parameters()).device
    for path in sorted({n.rsplit(".", 2)[0] for n in weights}):
        a = torch.from_numpy(np.ascontiguousarray(weights[f"{path}.lora_A.weight"], np.float32)).to(device)
        b = torch.from_numpy(np.ascontiguousarray(weights[f"{path}.lora_B.weight"], np.float32)).to(device)
        parent, _, child = path.rpartition(".")
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear):
            base = base.base_layer
        setattr(model.get_submodule(parent), child, LoRALinear(base, a, b, config.scaling, config.dropout))


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def lora_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().float().cpu().numpy() for n, p in lora_parameters(model).items()}


def loss_sums(backend, batch, features: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the batch's targets as a tensor, their count): PaliGemma's training loss.

    Only positions with a target reach the output head: the logits of the whole vocabulary at
    every position would be most of a step's memory.
    """
    model = backend.model
    ids = backend._ids(batch.input_ids)
    B, T = ids.shape
    if features is None:
        with torch.no_grad():  # the vision tower and projector are frozen
            features = model.image_features(torch.from_numpy(batch.pixels).to(backend._device, backend._dtype))
    h = model.embed(ids, features, torch.zeros(B, dtype=torch.int64, device=ids.device))
    masks = training_masks(batch.prefix_lens, batch.lengths, T, backend.config.text.sliding_window)
    masks = {k: torch.from_numpy(m).to(backend._device) for k, m in masks.items()}
    h = model.text(h, masks, None, 0)
    targets = backend._ids(batch.targets)
    where = targets >= 0
    logits = model.text.logits(h[where]).float()  # (n, vocab)
    return F.cross_entropy(logits, targets[where], reduction="sum"), int(where.sum())


class TorchTrainer(Trainer):
    def __init__(self, backend, lr: float, weight_decay: float = 0.0):
        self.backend = backend
        self.params = lora_parameters(backend.model)
        if not self.params:
            raise SettingError("no LoRA layers to train (add_lora first)")
        for p in self.params.values():
            p.requires_grad_(True)
        self.names = list(self.params)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=weight_decay)

    def accumulate(self, batch) -> tuple[float, int]:
        self.backend.model.train()  # LoRA dropout on
        loss, n = loss_sums(self.backend, batch)
        loss.backward()
        return float(loss.detach()), n

    def update(self, count: int) -> None:
        for p in self.params.values():
            if p.grad is not None:
                p.grad.div_(max(count, 1))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: p.grad.float().cpu().numpy() for n, p in self.params.items() if p.grad is not None}

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for name, p in self.params.items():
            s = self.optimizer.state.get(p)
            if s:
                out[f"{name}.m"] = s["exp_avg"].float().cpu().numpy()
                out[f"{name}.v"] = s["exp_avg_sq"].float().cpu().numpy()
                out["step"] = np.array(float(s["step"]), np.float32)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "step" not in state:
            return
        for name, p in self.params.items():
            self.optimizer.state[p] = {
                "step": torch.tensor(float(state["step"])),
                "exp_avg": torch.from_numpy(state[f"{name}.m"]).to(p.device, p.dtype),
                "exp_avg_sq": torch.from_numpy(state[f"{name}.v"]).to(p.device, p.dtype),
            }
