"""Constrained decoding for detect and segment: the answer must be a list of well-formed objects.

Grammar of an answer (what the parsers read back, as big_vision writes its training targets):

    answer  := eos | object (" ; " object)* eos
    object  := <loc>{4} <seg>{16} label     (segment; detect has no <seg> tokens)
               with the box's y_max > y_min and x_max > x_min (big_vision's valid box; for
               segment also in whole pixels of the image, where the mask is cut)
    label   := text pieces with at least one visible character, no ";", "<", ">" or line breaks

With it even a random or heavily quantized model yields objects the parsers accept: four
location tokens, sixteen codes for segment, a label, separators in their place. An object is
only started when the tokens left (`max_tokens`) can complete it, so a length cut never leaves
half an object (an answer with no room for one object is empty). The grammar knows token ids and the tokenizer's pieces, nothing of the model.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_LOC = re.compile(r"<loc[0-9]{4}>")
_SEG = re.compile(r"<seg[0-9]{3}>")
_SEPARATOR = re.compile(r" ?; ?")  # pieces that close a label: ";", " ;", "; ", " ; "
_NOT_LABEL = re.compile(r"[;<>\n\r\t]")

LOCS, CODES = 4, 16


class ObjectGrammar:
    """Allowed next tokens of a detect (`segment=False`) or segment answer, given the ids so far."""

    def __init__(self, tokenizer, segment: bool, vocab_size: int):
        self.segment = segment
        self.codes = CODES if segment else 0
        self.eos = tokenizer.eos_id
        controls = {tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id}
        n = vocab_size
        # sentencepiece pieces spell a space as U+2581
        self.texts = [tokenizer.piece(i).replace("\u2581", " ") if i not in controls else "" for i in range(n)]
        kind = np.zeros(n, dtype=np.int8)  # 0 other, 1 loc, 2 seg, 3 label, 4 separator, 5 one space
        self.loc_value = np.full(n, -1, dtype=np.int32)
        for i, t in enumerate(self.texts):
            if _LOC.fullmatch(t):
                kind[i] = 1
                self.loc_value[i] = int(t[4:8])
            elif _SEG.fullmatch(t):
                kind[i] = 2
            elif _SEPARATOR.fullmatch(t):
                kind[i] = 4
            elif t == " ":
                kind[i] = 5
            elif t.strip() and not _NOT_LABEL.search(t) and not (t.startswith("<") or t.endswith(">")) and i not in controls:
                kind[i] = 3
        self.kind = kind
        if not (kind == 1).any() or (segment and not (kind == 2).any()):
            raise ValueError("the tokenizer has no <locNNNN>/<segNNN> tokens; it is not a PaliGemma tokenizer")
        # the allowed set of each state, built once
        eos = np.zeros(n, dtype=bool)
        eos[self.eos] = True
        self._eos = eos
        # y_min and x_min leave room for a larger y_max and x_max
        start = (kind == 1) & (self.loc_value < self.loc_value.max())
        self._masks = {
            "first": start | eos,  # an empty answer is a valid one ("nothing found")
            "loc": start,
            "seg": kind == 2,
            "label_start": kind == 3,
            "label": (kind == 3) | (kind == 5) | eos,
            "label_or_separator": (kind == 3) | (kind == 5) | (kind == 4) | eos,
            "after_semicolon": start | (kind == 5),
        }
        self.object_len = LOCS + self.codes + 1  # and at least one label piece

    def state(self, ids) -> str:
        return self._walk(ids)[0]

    def _walk(self, ids) -> tuple[str, list[int]]:
        """The state after the ids generated so far (a walk over the answer, from its start), and
        the location values of the object being written."""
        phase, count, label, locs = "loc", 0, "", []
        for t in ids:
            t = int(t)
            if phase == "loc":
                count += 1
                locs.append(int(self.loc_value[t]) if 0 <= t < len(self.loc_value) else -1)
                if count == LOCS:
                    phase, count = ("seg", 0) if self.codes else ("label", 0)
                    label = ""
            elif phase == "seg":
                count += 1
                if count == self.codes:
                    phase, label = "label", ""
            elif phase == "label":
                label += self.texts[t] if 0 <= t < len(self.texts) else ""
                if ";" in label:
                    phase, label = "separator", label.split(";", 1)[1]
            elif phase == "separator":
                if 0 <= t < len(self.kind) and self.kind[t] == 1:
                    phase, count, locs = "loc", 1, [int(self.loc_value[t])]
                else:
                    label += self.texts[t] if 0 <= t < len(self.texts) else ""
        if phase == "loc":
            return ("first" if count == 0 and not len(ids) else "loc"), locs
        if phase == "seg":
            return "seg", locs
        if phase == "separator":
            return ("after_semicolon" if not label else "loc"), []
        return ("label" if label.strip() else "label_start"), locs

    def allowed(self, ids, remaining: int | None = None, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """Bool mask (vocab,) of the tokens that may come next; `remaining`: tokens left after this
        one; `image_size` (width, height): segment boxes must also be non-empty in whole pixels."""
        state, locs = self._walk(ids)
        if state == "first" and remaining is not None and remaining + 1 < self.object_len:
            return self._eos  # no room for a whole object: the empty answer
        if state == "loc" and len(locs) >= 2 and len(locs) < LOCS:
            # y_max > y_min, x_max > x_min: the third and fourth tokens exceed the first and second
            low = locs[len(locs) - 2]
            allowed = self.loc_value > low
            if self.segment and image_size is not None:
                # the mask's box is cut at whole pixels: a thin box would be empty there, and the
                # object invalid (y_max = 1023 always passes, since y_min < 1023)
                from .segmentation import pixel_edge

                size = image_size[1] if len(locs) == 2 else image_size[0]
                allowed &= pixel_edge(self.loc_value, size) > pixel_edge(low, size)
            return allowed
        if state == "label" and (remaining is None or remaining >= self.object_len + 1):
            # a separator only when a whole object can still follow it (" ;" then at least 4 + codes + 1)
            state = "label_or_separator"
        return self._masks[state]


class GrammarProcessor:
    """A logits processor (see sampling): each row with a grammar gets -inf on every token its
    grammar does not allow next; rows without one (other prompts of a batch) are left alone."""

    def __init__(self, grammars, max_tokens: int | Sequence[int], eos_id: int, image_sizes=None):
        self.grammars = list(grammars)
        # the most tokens each row may generate: one number for all, or one per row (a server's batch)
        self.max_tokens = [max_tokens] * len(self.grammars) if isinstance(max_tokens, int) else list(max_tokens)
        self.eos = eos_id
        # (width, height) of each row's original image, where segment masks are cut in pixels
        self.image_sizes = list(image_sizes) if image_sizes is not None else [None] * len(self.grammars)

    def __call__(self, generated: np.ndarray, logits: np.ndarray) -> np.ndarray:
        step = generated.shape[1]
        V = logits.shape[-1]
        for b, grammar in enumerate(self.grammars):
            if grammar is None or (generated[b] == self.eos).any():  # an ended row's ids are not used
                continue
            allowed = grammar.allowed(generated[b], self.max_tokens[b] - step - 1, self.image_sizes[b])[:V]
            row = np.where(allowed, logits[b], -np.inf)
            if not np.isfinite(row).any():
                # every allowed token was already at -inf (eos banned by min_tokens): the grammar wins
                row = np.where(allowed, 0.0, -np.inf)
            logits[b] = row
        return logits
