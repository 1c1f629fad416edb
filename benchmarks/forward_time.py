"""One GRU-Net forward pass on CPU, after one warm-up pass.

python benchmarks/forward_time.py TILE AMP CHANNELS_LAST     # e.g. 1152 bf16 true
"""

import sys
import time

import numpy as np
import torch

from wsi_grunet.model.checkpoint import resolve_weights
from wsi_grunet.model.predictor import Predictor


def main() -> None:
    size, amp, layout = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    predictor = Predictor(resolve_weights(None), "cpu", amp=amp, channels_last=layout == "true", tta="none")
    tile = (np.random.default_rng(0).random((1, size, size, 3)) * 255).astype(np.uint8)
    predictor.predict(tile)
    start = time.perf_counter()
    predictor.predict(tile)
    seconds = time.perf_counter() - start
    print(size, amp, layout, round(seconds, 2), "s", torch.get_num_threads(), "threads")


if __name__ == "__main__":
    main()
