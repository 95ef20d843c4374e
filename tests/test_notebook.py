"""examples/demo.ipynb runs top to bottom on the demo checkpoint (nbclient, a real Jupyter kernel)
and shows its pictures inline."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nbclient
import nbformat
import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_demo_notebook_runs_and_renders_its_images():
    nb = nbformat.read(EXAMPLES / "demo.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs
    # the kernel inherits this process's environment: MLX_PALIGEMMA_CACHE from conftest, PYTHONPATH
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    pictures = [
        Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"])))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})
    ]
    with Image.open(EXAMPLES / "images" / "chelsea.jpg") as chelsea, Image.open(EXAMPLES / "images" / "astronaut.jpg") as astronaut:
        # the photo, the detection and segmentation pictures (drawn on the astronaut, at its size), the batch's strip
        strip = (160 * len(list((EXAMPLES / "images").glob("*.jpg"))), 120)
        assert [p.size for p in pictures] == [chelsea.size, astronaut.size, astronaut.size, strip]
        # constrained, the demo's detect and segment answers hold objects: both pictures have something drawn
        photo = np.asarray(astronaut.convert("RGB"), np.float32)
        for drawn in pictures[1:3]:
            assert np.abs(np.asarray(drawn.convert("RGB"), np.float32) - photo).mean() > 1
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "demo-v" in texts and "tokens in" in texts  # the demo checkpoint, and a stats line
