"""Developer tools, not part of the library: the benchmark (`paligemma bench`) and the writer of
full-size random-weight checkpoints it and scripts/parity_full.py run on.

The library never imports this package; it may import the library.
"""
