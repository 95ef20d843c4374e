"""The checkpoint's tokenizer and the PaliGemma prompt layout.

Prompt tokens follow transformers' PaliGemmaProcessor: `<image>` x N, `<bos>`, the prompt
tokens, then `\\n`, with no second bos. The sentencepiece model (tokenizer.model) is the
preferred source; a folder with only tokenizer.json is read with the `tokenizers` package.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, PromptError

LOC_COUNT = 1024
SEG_COUNT = 128


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
    """Turns a growing list of token ids into text pieces, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a byte-fallback character not yet complete
        piece, self.text = text[len(self.text):], text
        return piece
