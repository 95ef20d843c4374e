"""The interactive shell of `paligemma chat`: one model, one current image, many prompts.

It is a thin loop over the public API (`Model.stream` and its detections, `parse_segments`, the drawing):
it reads a line, changes a setting or runs a prompt about the current image, and prints the
streamed answer and its stats line through `print_fn`, so a test can drive it with prompt_toolkit's
pipe input and capture everything it says.
"""

from __future__ import annotations

import builtins
import math
import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .demo import DEMO_NOTE
from .errors import PaliGemmaError, SettingError
from .prompts import is_detection_prompt, is_segmentation_prompt, task_prompt
from .sampling import SamplingParams

HISTORY_ENV = "MLX_PALIGEMMA_HISTORY"

# command -> (argument, what it does); the order is the order /help lists them in
COMMANDS = {
    "/image": ("PATH", "use the picture at PATH for the next prompts"),
    "/temperature": ("V", "sampling temperature, >= 0 (0 = greedy)"),
    "/top_p": ("V", "nucleus sampling mass, in (0, 1]"),
    "/top_k": ("N", "sample among the N most likely tokens (0 = no limit)"),
    "/max_tokens": ("N", "most tokens an answer may have, >= 1"),
    "/seed": ("N", "random seed of the sampler, >= 0"),
    "/repetition_penalty": ("V", "> 1 makes ids already seen less likely (1 = none)"),
    "/stop": ("TEXT ...", "end answers at these texts (quotes for spaces, \\n for a newline; none: no stop)"),
    "/constrain": ("on|off", "hold detect/segment answers to the objects' grammar (on by default)"),
    "/settings": ("", "show the current settings"),
    "/save": ("PATH", "write the last boxes or masks drawn on their image (.jpg, .png or .webp)"),
    "/help": ("", "this list"),
    "/quit": ("", "leave (also `exit` or Ctrl-D)"),
}
TASKS = {
    "describe": "a long description of the image",
    "caption": "a short caption",
    "ocr": "the text in the image",
    "detect THING ; THING": "boxes around things",
    "segment THING ; THING": "masks of things",
}
EXIT_WORDS = ("exit", "quit", "/quit", "/exit")
PATH_COMMANDS = ("/image", "/save")


@dataclass
class Settings:
    """What the shell (and one CLI run) generates with. The image is a path; the shell loads it."""

    model: str = "google/paligemma2-3b-mix-224"
    backend: str = "auto"
    dtype: str | None = None
    adapter: str | None = None  # a LoRA adapter folder
    image: str | None = None
    lang: str = "en"
    # constrain: detect/segment answers follow the objects' grammar, on in the shell unless turned off
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(constrain=True))
    vae: str | None = None  # mask decoder file for segment (None: found when first needed)

    def validate(self) -> "Settings":
        """The checks the API makes, done before a model is loaded; raises SettingError."""
        self.sampling.validate()
        return self


def history_path() -> Path:
    """$MLX_PALIGEMMA_HISTORY, else the XDG state folder (~/.local/state/mlx-paligemma/history)."""
    override = os.environ.get(HISTORY_ENV)
    if override:
        return Path(os.path.expanduser(override))
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "mlx-paligemma" / "history"


def _make_completer():
    from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter
    from prompt_toolkit.document import Document

    class ShellCompleter(Completer):
        """Command words at the start of a line, file paths after /image and /save."""

        def __init__(self):
            words = list(COMMANDS) + ["describe", "caption", "ocr", "detect", "segment", "exit"]
            self.words = WordCompleter(words, sentence=True)
            self.paths = PathCompleter(expanduser=True)

        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            head, sep, arg = text.lstrip().partition(" ")
            if not sep:
                yield from self.words.get_completions(document, complete_event)
            elif head in PATH_COMMANDS:
                arg = arg.lstrip()
                # completions' start positions are relative to the cursor, the same in both documents
                yield from self.paths.get_completions(Document(arg, len(arg)), complete_event)

    return ShellCompleter()


class Shell:
    """The state of one session: settings, the loaded model, the current image, the last picture."""

    def __init__(self, model_loader: Callable[[], object], settings: Settings, print_fn: Callable = None):
        self.settings = replace(settings)
        self.print = print_fn or _print
        self._loader = model_loader
        self.model = None
        self.image = None  # the loaded RGB picture of settings.image
        # the objects of the last detect/segment answer and the image they are on, for /save
        self.last_segments = None  # Segments (masks) of the last segment answer
        self.last_detections: list = []  # boxes of the last answer (segment: those without masks)
        self.last_image = None
        self._vae_noted = False  # the demo decoder's note is said once

    def load(self) -> None:
        """Load the model once and the start image; a failure here ends the session."""
        self.model = self._loader()
        if self.settings.image:
            self.image = _load_image(self.settings.image)

    def banner(self) -> None:
        self.print("PaliGemma shell. Commands:")
        self.help()
        if getattr(self.model, "is_demo", False):
            self.print(DEMO_NOTE)
        self.show_settings()

    def help(self) -> None:
        for name, (arg, what) in COMMANDS.items():
            self.print(f"  {(name + ' ' + arg).strip():<22} {what}")
        for name, what in TASKS.items():
            self.print(f"  {name:<22} {what}")
        self.print("  anything else is sent as a prompt about the current image; Ctrl-C stops an answer")

    def show_settings(self) -> None:
        s, p = self.settings, self.settings.sampling
        backend = getattr(getattr(self.model, "backend", None), "name", s.backend)
        self.print(f"  model        {s.model}")
        self.print(f"  backend      {backend}")
        self.print(f"  image        {s.image or '(none: set one with /image PATH)'}")
        self.print(f"  temperature  {p.temperature:g}")
        self.print(f"  top_p        {p.top_p:g}")
        self.print(f"  top_k        {p.top_k}")
        self.print(f"  max_tokens   {p.max_tokens}")
        self.print(f"  seed         {p.seed}")
        self.print(f"  repetition_penalty {p.repetition_penalty:g}")
        self.print(f"  stop         {_shown(p.stop)}")
        self.print(f"  constrain    {_shown(p.constrain)}")

    def prompt_text(self) -> str:
        name = Path(self.settings.image).name if self.settings.image else "no image"
        return f"[{name}]> "

    def handle(self, line: str) -> bool:
        """Run one line; False means the session ends."""
        line = line.strip()
        if not line:
            return True
        if line in EXIT_WORDS:
            return False
        word, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if word.startswith("/"):
                self.command(word, arg)
            elif line in ("describe", "caption", "ocr"):
                self.ask(task_prompt(line, lang=self.settings.lang))
            elif word in ("detect", "segment"):
                self.ask(task_prompt(word, arg))
            else:
                self.ask(line)
        except PaliGemmaError as e:
            self.print(f"error: {e}")
        return True

    def command(self, word: str, arg: str) -> None:
        if word in SETTERS:
            self.set(word[1:], arg)
        elif word == "/image":
            if not arg:
                raise SettingError("/image needs a path, like /image cat.jpg")
            path = os.path.expanduser(arg)
            self.image = _load_image(path)  # raises ImageError; the old image stays
            self.settings.image = path
            w, h = self.image.size
            self.print(f"image {path} ({w}x{h})")
        elif word == "/settings":
            self.show_settings()
        elif word == "/save":
            self.save(arg)
        elif word == "/help":
            self.help()
        else:
            self.print(f"unknown command {word}; /help lists the commands")

    def set(self, name: str, arg: str) -> None:
        old = getattr(self.settings.sampling, name)
        try:
            value = SETTERS["/" + name](arg)
            candidate = replace(self.settings.sampling, **{name: value})
            # the model's context bounds max_tokens; a generation reports any other setting it cannot take
            candidate.validate(getattr(self.model, "context_len", None) if name == "max_tokens" else None)
        except SettingError as e:
            self.print(f"error: {e}; {name} stays {_shown(old)}")
            return
        self.settings = replace(self.settings, sampling=candidate)
        self.print(f"{name} = {_shown(value)}")

    def save(self, arg: str) -> None:
        from .image import save_image_atomic
        from .segmentation import draw_segments

        if not arg:
            raise SettingError("/save needs a path, like /save boxes.jpg")
        if self.last_image is None:
            self.print("no boxes or masks yet: run `detect THING` or `segment THING` first")
            return
        picture = draw_segments(self.last_image, self.last_segments or (), self.last_detections)
        path = save_image_atomic(picture, os.path.expanduser(arg))  # a temporary file, then a rename
        self.print(f"saved {path}")

    def ask(self, prompt: str) -> None:
        if self.image is None:
            self.print("no image yet: choose one with /image PATH first")
            return
        segmenting = is_segmentation_prompt(prompt)
        vae = self.model.mask_decoder() if segmenting else None  # a missing decoder: an error before generating
        if vae is not None and getattr(vae, "demo", False) and not getattr(self.model, "is_demo", False) and not self._vae_noted:
            self._vae_noted = True
            self.print(f"note: {vae.source} is the demo mask decoder (random weights): its masks mean nothing")
        pieces = self.model.stream(self.image, prompt, params=self.settings.sampling)
        try:
            for piece in pieces:
                self.print(piece, end="", flush=True)
        except KeyboardInterrupt:
            pieces.close()
            self.print("\n(stopped)")
            return
        result = self.model.last
        self.print()
        if segmenting:
            self.show_segments(result, vae)
        elif is_detection_prompt(prompt):
            self.show_boxes(result)
        self.print(result.stats.line())

    def show_boxes(self, result) -> None:
        from .detection import format_detections

        detections = result.detections
        if not detections:
            self._keep(None, [])  # /save never draws an earlier answer's objects
            self.print("(no boxes in the answer)")
            return
        self.print(format_detections(detections))
        self._keep(None, detections)
        self.print("(/save PATH writes the picture with these boxes)")

    def show_segments(self, result, vae) -> None:
        from .detection import format_detections
        from .segmentation import format_segments, parse_segments

        segments = parse_segments(result.text, result.image_size, vae)
        if segments:
            self.print(format_segments(segments))
        if segments.detections:
            self.print(format_detections(segments.detections))
        if segments.invalid:
            self.print(f"({segments.invalid} malformed object(s) in the answer skipped)")
        if not segments and not segments.detections:
            self._keep(None, [])
            self.print("(no masks in the answer)")
            return
        self._keep(segments, list(segments.detections))
        self.print("(/save PATH writes the picture with these masks)")

    def _keep(self, segments, detections) -> None:
        """The objects /save draws: those of the last detect/segment answer (none: nothing to save)."""
        found = bool(segments) or bool(detections)
        self.last_segments, self.last_detections = segments, detections
        self.last_image = self.image if found else None


def _number(arg: str) -> float:
    try:
        v = float(arg)
    except ValueError:
        raise SettingError(f"expected a number, got {arg!r}") from None
    if not math.isfinite(v):
        raise SettingError(f"expected a finite number, got {arg!r}")
    return v


def _whole(arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise SettingError(f"expected a whole number, got {arg!r}") from None


def _on_off(arg: str) -> bool:
    words = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    if arg.lower() not in words:
        raise SettingError(f"expected on or off, got {arg!r}")
    return words[arg.lower()]


def _strings(arg: str) -> tuple[str, ...]:
    """Words or quoted texts; `\\n` and `\\t` stand for a newline and a tab (a prompt line cannot hold them)."""
    lexer = shlex.shlex(arg, posix=True)
    lexer.whitespace_split, lexer.escape = True, ""
    try:
        words = list(lexer)
    except ValueError as e:
        raise SettingError(f"expected words or quoted texts ({str(e).lower()})") from None
    return tuple(re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), w) for w in words)


def _shown(value) -> str:
    """A setting as /settings shows it: stop strings quoted (a newline as \\n), (none) when there are none."""
    if isinstance(value, tuple):
        return " ".join(repr(s) for s in value) or "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


SETTERS = {
    "/temperature": _number,
    "/top_p": _number,
    "/top_k": _whole,
    "/max_tokens": _whole,
    "/seed": _whole,
    "/repetition_penalty": _number,
    "/stop": _strings,
    "/constrain": _on_off,
}

def _load_image(path: str):
    from .image import load_image

    return load_image(path)


def _print(*args, **kwargs) -> None:
    kwargs.setdefault("flush", True)
    builtins.print(*args, **kwargs)


def _history():
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError:
        return InMemoryHistory(), f"note: cannot write the history file {path}; history is kept for this session only"
    return FileHistory(str(path)), None


def run_shell(
    model_loader: Callable[[], object],
    settings: Settings,
    input=None,
    output=None,
    print_fn: Callable | None = None,
) -> int:
    """The interactive loop; returns the exit code (0, or 2 when the model or image cannot load).

    input/output: prompt_toolkit Input and Output (a pipe input and DummyOutput in tests; the
    terminal when None). print_fn receives everything the shell says, print-style.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory

    shell = Shell(model_loader, settings, print_fn)
    try:
        settings.validate()
        shell.load()
    except PaliGemmaError as e:
        shell.print(f"error: {e}")
        return 2
    history, note = _history()
    if note:
        shell.print(note)
    session = PromptSession(
        history=history,
        auto_suggest=AutoSuggestFromHistory(),
        enable_history_search=True,
        completer=_make_completer(),
        input=input,
        output=output,
    )
    shell.banner()
    while True:
        try:
            line = session.prompt(shell.prompt_text())
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt: a fresh prompt
        except EOFError:
            break  # Ctrl-D, or the end of piped input
        if not shell.handle(line):
            break
    return 0
