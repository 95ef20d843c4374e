"""Task prompts of the mix checkpoints, shared by every surface (CLI, shell, server, batch).

`caption en`, `describe en`, `ocr`, `answer en <question>`, `question en <answer>`,
`detect <thing> ; <thing>`, `segment <thing> ; <thing>`; other languages by code.
"""

from __future__ import annotations

from .errors import SettingError

TASKS = ("caption", "describe", "ocr", "answer", "question", "detect", "segment")


def task_prompt(word: str, argument: str = "", lang: str = "en") -> str:
    """A task word (and its argument) -> the prompt the mix checkpoints were trained on."""
    if word in ("describe", "caption"):
        return f"{word} {lang}"
    if word == "ocr":
        return "ocr"
    if word in ("answer", "question"):
        if not argument.strip():
            raise SettingError(f"{word} needs some text, like `{word} what is in the picture?`")
        return f"{word} {lang} {argument.strip()}"
    if word in ("detect", "segment"):
        return f"{word} " + detect_things(argument, word)
    raise SettingError(f"unknown task {word!r}; one of {', '.join(TASKS)}")


def detect_things(text: str, task: str = "detect") -> str:
    """`car;person ; ` -> `car ; person`, the separator the model was trained on."""
    things = [t.strip() for t in text.split(";") if t.strip()]
    if not things:
        raise SettingError(f"{task} needs at least one thing to look for, like `{task} car ; person`")
    return " ; ".join(things)


def is_detection_prompt(prompt: str) -> bool:
    """Prompts whose answers are objects (boxes, and masks for segment)."""
    return prompt.startswith(("detect ", "segment "))


def is_segmentation_prompt(prompt: str) -> bool:
    return prompt.startswith("segment ")
