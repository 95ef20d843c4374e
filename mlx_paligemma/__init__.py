"""mlx-paligemma: PaliGemma 1 and 2 on MLX, with a PyTorch backend that gives the same results.

    import mlx_paligemma as pg
    model = pg.load("google/paligemma2-3b-mix-224")
    print(model.generate("cat.jpg", "caption en").text)

Importing this package pulls in neither mlx nor torch: each backend is imported when chosen.
"""

from .api import Generation, Model, load
from .detection import Detection, draw_detections, parse_detections
from .errors import CheckpointError, ImageError, OutputError, PaliGemmaError, PromptError, SettingError
from .generate import Stats
from .segmentation import Segment, Segments, draw_segments, parse_segments
from .vae import load_vae
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "Generation", "Stats", "SamplingParams", "Detection", "parse_detections", "draw_detections",
    "Segment", "Segments", "parse_segments", "draw_segments", "load_vae",
    "PaliGemmaError", "SettingError", "ImageError", "PromptError", "CheckpointError", "OutputError",
]
