"""The checkpoint's tokenizer and the PaliGemma prompt layout.

Prompt tokens follow transformers' PaliGemmaProcessor: `<image>` x N, `<bos>`, the prompt
tokens, then `\\n`, with no second bos. The sentencepiece model (tokenizer.model) is the
preferred source; a folder with only tokenizer.json is read with the `tokenizers` package.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, PromptError


class Tokenizer:
    def __init__(self, folder: Path):
        model = folder / "tokenizer.model"
        self._sp = None
        self._hf = None
        if model.exists():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            try:
                sp.Load(str(model))
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{model}: not a valid sentencepiece model ({str(e).splitlines()[0]})") from None
            self._sp = sp
            self.vocab_size = sp.get_piece_size()
            self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
        elif (folder / "tokenizer.json").exists():
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise CheckpointError(
                    f"{folder}: has tokenizer.json but no tokenizer.model; install `tokenizers` to read it"
                ) from None
            try:
                self._hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise CheckpointError(f"{folder / 'tokenizer.json'}: cannot be read ({e})") from None
            # special tokens typed as text stay text, as sentencepiece does: `<image>` in a prompt
            # must not become a second image slot, nor `<eos>` an end of the prompt
            self._hf.encode_special_tokens = True
            vocab = self._hf.get_vocab(with_added_tokens=True)
            # `<image>` is an added token after the real vocabulary; the real vocabulary ends before it
            self.vocab_size = vocab.get("<image>", len(vocab))
            self.bos_id, self.eos_id, self.pad_id = vocab.get("<bos>", 2), vocab.get("<eos>", 1), vocab.get("<pad>", 0)
        else:
            raise CheckpointError(f"{folder}: no tokenizer.model or tokenizer.json in the checkpoint folder")

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from undecodable bytes on a command line
            raise PromptError(f"the text is not valid Unicode (character {e.start} is {text[e.start]!r})") from None
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        if self._sp is not None:
            return self._sp.id_to_piece(int(token_id))
        return self._hf.id_to_token(int(token_id)) or ""

    def prompt_ids(self, prompt: str, num_image_tokens: int, image_token_id: int) -> list[int]:
        """`<image>` x N, `<bos>`, prompt, `\\n` (transformers' PaliGemmaProcessor layout).

        The prompt is text: `<image>`, `<bos>`, `<eos>` and `<pad>` typed in it are encoded as
        characters, never as those tokens (transformers would turn `<eos>` into the eos id, and
        refuses a second `<image>`). `<loc0001>` and `<seg001>` stay single tokens, as in transformers.
        """
        text = self.encode(prompt + "\n")
        controls = {image_token_id, self.bos_id, self.eos_id, self.pad_id}
        if controls.intersection(text):  # pragma: no cover - a tokenizer whose model maps text to them
            raise PromptError("the tokenizer turned prompt text into a control token (<image>, <bos>, <eos> or <pad>)")
        return [image_token_id] * num_image_tokens + [self.bos_id] + text


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, for one answer.

    Held back until more ids come: an incomplete character, and text that may be the start of a
    stop string. Once the text holds a stop string it ends right before it (`stopped` is True).
    The pieces, with `flush()` at the end, add up to `text`, the whole answer.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # what has been given out so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._give(text[:cut])
        if text.endswith("\ufffd"):
            return ""  # a byte-fallback character not yet complete
        return self._give(text[: len(text) - partial_stop(text, self.stop)])

    def flush(self) -> str:
        """What is still held back, at the end of the answer."""
        return "" if self.stopped else self._give(self.tokenizer.decode(self.ids))

    def _give(self, text: str) -> str:
        # sentencepiece decoding is append-only (no dummy prefix, whitespace kept): text extends self.text
        piece, self.text = text[len(self.text):], text
        return piece


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest end of text that is the start of a stop string (0 if none)."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
