"""cli.py and convert.py at the repository root work from a clone as the installed commands do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlx_paligemma.checkpoint import open_checkpoint
from mlx_paligemma.demo import demo_checkpoint

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "images" / "coffee.jpg"


def run(*args, cwd: Path, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a clone: nothing set up
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=180, stdin=subprocess.DEVNULL)


def test_cli_py_answers_as_the_installed_command(tmp_path):
    args = ["caption", PHOTO, "--model", "demo", "--backend", "torch", "--max-tokens", "4", "--json"]
    script = run(REPO / "cli.py", *args, cwd=tmp_path)  # from another folder, by path
    assert script.returncode == 0, script.stderr
    module = run("-m", "mlx_paligemma", *args, cwd=REPO, env_path=str(REPO))
    assert module.returncode == 0, module.stderr
    ours, theirs = json.loads(script.stdout), json.loads(module.stdout)
    assert ours["token_ids"] == theirs["token_ids"] and ours["text"] == theirs["text"] and len(ours["token_ids"]) == 4
    bad = run("cli.py", "caption", tmp_path / "missing.jpg", "--model", "demo", cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_convert_py_converts_as_the_installed_command(tmp_path):
    out = tmp_path / "bf16"
    proc = run("convert.py", demo_checkpoint(), out, "--dtype", "bfloat16", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    # what the converter itself promises is tested in test_convert.py; here: the script ran it
    assert open_checkpoint(out).stored_dtype == "bfloat16" != open_checkpoint(demo_checkpoint()).stored_dtype
    bad = run("convert.py", tmp_path / "nowhere", tmp_path / "out", cwd=REPO)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()
