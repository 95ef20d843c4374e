"""Command-line parsing shared by the surfaces (`paligemma`, `paligemma convert`, `paligemma bench`).

Each surface owns its parser; this is only the argparse flavour they share: a bad command line
is reported as one line, never as the whole usage text followed by an exit.
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A command line argparse rejects; reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage and exit; we want one line
        raise UsageError(message)
