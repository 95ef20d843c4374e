"""`paligemma batch`: the command, on this machine (batch.run_batch) or on a Ray cluster (ray_batch).

The pipelines share the pieces of batch.py; this module only chooses one and reports progress.
"""

from __future__ import annotations

import sys

from .batch import collect_items, group_by_image, need_pycocotools, open_output, pending, run_batch
from .errors import SettingError
from .prompts import is_segmentation_prompt


def tqdm_progress(total: int, done: int, quiet: bool):
    """A tqdm bar on stderr: images/s, tokens/s, ETA. None when quiet."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def update(row, counts, seconds):
        bar.update(1)
        bar.set_postfix_str(f"{counts['tokens'] / max(seconds, 1e-9):.1f} tokens/s, {counts['errors']} errors", refresh=False)

    return update, bar.close


def run_command(args, settings, load_model) -> int:
    """`paligemma batch`: the CLI's parsed args and checked settings; `load_model()` loads once."""
    from .demo import DEMO_NOTE

    if args.ray and settings.backend == "mlx":
        raise SettingError("--ray runs the torch backend in its actors; use --backend torch (or auto) with --ray")
    if not isinstance(args.batch_size, int) or args.batch_size < 1:
        raise SettingError(f"--batch-size must be a whole number >= 1, got {args.batch_size!r}")
    items = collect_items(args.input, args.task, args.prompt, settings.lang)
    output = open_output(args.output)
    if args.ray:
        from .ray_batch import check_ray

        check_ray()
    segmenting = any(it.prompt and is_segmentation_prompt(it.prompt) for it in items)
    if segmenting:
        need_pycocotools()
    done_rows = output.existing()
    todo = group_by_image(pending(items, done_rows))
    kwargs = dict(params=settings.sampling)
    done = len(items) - len(todo)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if done:
        say(f"{done} of {len(items)} rows already in {args.output}; {len(todo)} to do")
    if todo:
        if args.ray:
            from .ray_batch import run_ray

            update, close = tqdm_progress(len(items), done, args.quiet)
            try:
                counts = run_ray(settings, todo, output, args.batch_size, args.address, args.ray_actors,
                                 args.ray_cpus, update, **kwargs)
            finally:
                close()
        else:
            model = load_model()
            # the settings against this model (the prompt is checked per row, as an error row)
            model.check("ocr", **kwargs)
            if model.is_demo:
                say(DEMO_NOTE)
            if segmenting:
                model.mask_decoder()  # a missing decoder: one error line before any row
            update, close = tqdm_progress(len(items), done, args.quiet)
            try:
                counts = run_batch(model, todo, output, args.batch_size, update, **kwargs)
            except KeyboardInterrupt:
                close()
                say(f"\nthe rows written so far are kept; run the same command again to resume")
                raise
            close()
        say(f"{counts['rows']} rows ({counts['errors']} errors) in {counts['seconds']:.1f} s: "
            f"{counts['rows'] / max(counts['seconds'], 1e-9):.2f} images/s, "
            f"{counts['tokens'] / max(counts['seconds'], 1e-9):.1f} tokens/s")
    output.finish()
    say(f"results: {args.output}")
    return 0
