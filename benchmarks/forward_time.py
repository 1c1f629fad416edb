"""One GRU-Net forward pass on CPU: python benchmarks/forward_time.py TILE AMP CHANNELS_LAST (e.g. 1152 bf16 true)."""

import time, numpy as np, torch, sys
from wsi_grunet.model.checkpoint import resolve_weights
from wsi_grunet.model.predictor import Predictor

size = int(sys.argv[1])
amp = sys.argv[2]
cl = sys.argv[3]
b = resolve_weights(None)
p = Predictor(b, "cpu", amp=amp, channels_last={"true": True, "false": False}[cl], tta="none")
x = (np.random.default_rng(0).random((1, size, size, 3)) * 255).astype(np.uint8)
p.predict(x)
t = time.perf_counter()
p.predict(x)
dt = time.perf_counter() - t
print(size, amp, cl, round(dt, 2), "s", torch.get_num_threads(), "threads")
