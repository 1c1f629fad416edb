"""Run GRU-Net in TIAToolbox's SemanticSegmentor and compare with wsi-grunet's own predictor.

Runs inside the TIAToolbox environment (``.venv-tiatoolbox/bin/python``). Writes a JSON report:
patch mode (one patch read from the slide through TIAToolbox's reader) and WSI mode (the whole slide, no
tissue mask), each against ``Predictor.predict`` on the same pixels, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import zarr
from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
from tiatoolbox.wsicore.wsireader import WSIReader

from wsi_grunet.interop.tiatoolbox_model import GRUNetTIAModel
from wsi_grunet.model.checkpoint import resolve_weights
from wsi_grunet.model.predictor import Predictor
from wsi_grunet.slide.reader import SlideReader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--slide", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--halo", type=int, default=64)
    args = parser.parse_args()
    patch, halo = args.patch, args.halo
    core = patch - 2 * halo

    model = GRUNetTIAModel.from_weights(args.weights, patch=patch, halo=halo)
    ours = Predictor(resolve_weights(args.weights), device="cpu", amp="fp32", channels_last=False, tta="none")
    mpp = model.mpp
    reader = WSIReader.open(args.slide)

    def read(bounds: tuple[int, int, int, int]) -> np.ndarray:  # as TIAToolbox's WSIPatchDataset reads
        return reader.read_bounds(
            bounds, resolution=mpp, units="mpp", pad_constant_values=255, coord_space="resolution"
        )

    engine = SemanticSegmentor(model=model, batch_size=2, device="cpu", verbose=False)
    report: dict = {"patch": patch, "halo": halo, "mpp": mpp}

    # Patch mode: one interior patch.
    x0, y0 = 3 * core, 2 * core
    pixels = read((x0, y0, x0 + patch, y0 + patch))
    out = engine.run(
        pixels[None], patch_mode=True, ioconfig=model.ioconfig, output_type="dict", return_probabilities=True
    )
    tia = np.asarray(out["probabilities"])[0, ..., 1]
    mine = ours.predict(np.ascontiguousarray(pixels[None]))["prob"][0, halo:-halo, halo:-halo]
    report["patch_mode"] = {
        "shape": list(tia.shape),
        "max_abs_diff": float(np.abs(tia - mine).max()),
        "prob_std": float(mine.std()),
    }

    # WSI mode: the whole slide, every patch (no tissue mask), probabilities kept in the zarr output.
    with tempfile.TemporaryDirectory() as tmp:
        saved = engine.run(
            [Path(args.slide)],
            patch_mode=False,
            ioconfig=model.ioconfig,
            save_dir=Path(tmp) / "o",
            output_type="zarr",
            auto_get_mask=False,
            return_probabilities=True,
            overwrite=True,
        )
        path = saved[Path(args.slide)] if isinstance(saved, dict) else saved
        group = zarr.open(str(path), mode="r")
        prob = np.asarray(group["probabilities"])[..., 1]
        report["wsi_mode"] = {"keys": sorted(group.keys()), "shape": list(prob.shape)}
    ours_shape = SlideReader(args.slide, mpp, None).model_shape
    report["wsi_mode"]["wsi_grunet_model_shape"] = [int(v) for v in ours_shape]
    report["wsi_mode"]["tiatoolbox_model_shape"] = [int(v) for v in reader.slide_dimensions(mpp, "mpp")][::-1]
    diffs = []
    for oy in range(core, prob.shape[0] - 2 * core, core):  # interior output patches, each against our predictor
        for ox in range(core, prob.shape[1] - 2 * core, core):
            pixels = read((ox - halo, oy - halo, ox - halo + patch, oy - halo + patch))
            mine = ours.predict(np.ascontiguousarray(pixels[None]))["prob"][0, halo:-halo, halo:-halo]
            diffs.append(float(np.abs(prob[oy : oy + core, ox : ox + core] - mine).max()))
            if len(diffs) >= 6:
                break
        if len(diffs) >= 6:
            break
    report["wsi_mode"]["patches_compared"] = len(diffs)
    report["wsi_mode"]["max_abs_diff"] = max(diffs)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
