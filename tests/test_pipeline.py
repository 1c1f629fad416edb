"""End-to-end pipeline: a small GRU-Net trained here on synthetic discs, real OpenSlide, real Dask,
real zarr read back with ome-zarr, GeoJSON checked against QuPath's contract."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
import zarr
from distributed import Client, LocalCluster
from PIL import Image
from scipy import ndimage

from wsi_grunet.cli import main
from wsi_grunet.config import DEFAULT_HALO, load_config
from wsi_grunet.examples import example_slide
from wsi_grunet.geometry import Box
from wsi_grunet.inference import DriverBackend, TileRun, WorkerBackend, make_predictor, tile_maps
from wsi_grunet.model.checkpoint import load_checkpoint, packaged_weights
from wsi_grunet.model.predictor import Predictor, predict_image
from wsi_grunet.pipeline import finish_slide, postprocess_params, prepare_slide, run_slide
from wsi_grunet.postprocess import label_nuclei
from wsi_grunet.slide.reader import SlideReader
from wsi_grunet.tile_work import process_tile, read_tile

from qupath_contract import check_qupath_feature_collection
from synthetic import write_rgb_image, write_synthetic_slide

MPP = 0.5


def _disc_labels(truth: dict) -> np.ndarray:
    labels = np.zeros(truth["shape"], np.uint16)
    yy, xx = np.mgrid[: truth["shape"][0], : truth["shape"][1]]
    for k, ((cy, cx), r) in enumerate(zip(truth["centres"], truth["radii"]), start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (r / truth["mpp"]) ** 2] = k
    return labels


@pytest.fixture(scope="session")
def disc_checkpoint() -> Path:
    """The packaged full-width weights: they find the synthetic nuclei (dark discs on pink tissue)."""
    path = packaged_weights()
    assert path is not None, "the packaged weights are missing"
    return path


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as c,
    ):
        yield c


def _cfg(checkpoint: Path, tile: int, halo: int, amp: str = "fp32", **extra):
    """fp32 by default: the border contract is exact arithmetic's; bf16 adds its own rounding noise."""
    overrides = [
        {
            "model": {"weights": str(checkpoint), "device": "cpu", "amp": amp, "tta": "none"},
            "tiling": {"tile_size": tile, "halo": halo},
            "output": {"chunk": 64, "pyramid_levels": 3},
            **extra,
        }
    ]
    return load_config(None, overrides)


def _check_border_contract(slide: Path, out: Path, checkpoint: Path, client, tiles, edge: int, tolerance: float):
    """Run the slide at each (tile, halo): the stored probability equals one pass over the whole slide
    within ``tolerance`` + 1/255 (uint8 storage), and every nucleus more than ``edge`` px from the slide
    edge whose group of touching nuclei fits in the halo is the single pass's, pixel for pixel, and no
    other nucleus appears there (groups with a pixel within 1e-3 of the threshold are left out: float
    rounding may decide it either way)."""
    bundle = load_checkpoint(checkpoint)
    predictor = Predictor(bundle, "cpu", amp="fp32", tta="none")
    reader = SlideReader(slide, MPP)
    single = predict_image(predictor, reader.read(Box(0, 0, *reader.model_shape)))["prob"]
    params = postprocess_params(bundle, _cfg(checkpoint, *tiles[0]))
    single_labels = label_nuclei(single, MPP, params)
    inner = Box(edge, edge, single.shape[0] - edge, single.shape[1] - edge)
    # ownership.py guarantees the nuclei of foreground groups no wider than the halo; a larger group of
    # touching nuclei cut by a tile's read box may be split differently (counted in report.json)
    groups, _ = ndimage.label(single > params.threshold, structure=np.ones((3, 3)))
    group_boxes = ndimage.find_objects(groups)
    # a pixel within float rounding of the threshold may fall either way in a tile; that moves the
    # watershed lines of its whole group, so such groups are not compared
    undecided = np.abs(single - params.threshold) < 1e-3
    undecided_groups = set(np.unique(groups[ndimage.binary_dilation(undecided) & (groups > 0)]).tolist())
    narrowest_halo = min(h for _, h in tiles)

    def compared(group: int) -> bool:
        """Whether nuclei of this single-pass group must match; 0 (background there) always does."""
        if group == 0:
            return True
        box = group_boxes[group - 1]
        return max(sl.stop - sl.start for sl in box) <= narrowest_halo and group not in undecided_groups

    def nuclei_inside(labels: np.ndarray, guaranteed_only: bool = False) -> set[tuple]:
        found = set()
        for k in np.unique(labels[labels > 0]):
            ys, xs = np.nonzero(labels == k)
            if ys.min() >= inner.y0 and xs.min() >= inner.x0 and ys.max() < inner.y1 and xs.max() < inner.x1:
                if guaranteed_only and not compared(groups[ys[0], xs[0]]):
                    continue
                found.add(tuple(np.ravel_multi_index((ys, xs), labels.shape)))
        return found

    expected = nuclei_inside(single_labels, guaranteed_only=True)
    assert len(expected) >= 10, "the test slide should hold many nuclei away from its edge"
    assert len(expected) >= 0.8 * len(nuclei_inside(single_labels)), "most nuclei should be in small groups"
    for tile, halo in tiles:
        cfg = _cfg(checkpoint, tile, halo)
        assert any(t % (tile - 2 * halo) == 0 for t in range(inner.y0 + 1, inner.y1)), "no tile border inside"
        backend = DriverBackend(client, make_predictor(bundle, cfg.model), cfg)
        result = run_slide(slide, slide.stem, out / str(tile), cfg, bundle, backend, client, progress=False)
        assert result.status == "ok"
        # Workers that only read and post-process never load torch (a lambda travels by value).
        assert not any(client.run(lambda: "torch" in __import__("sys").modules).values())
        root = zarr.open_group(str(out / str(tile) / slide.stem / f"{slide.stem}.ome.zarr"), mode="r")
        stitched = root["0"][:].astype(np.float32) / 255
        diff = np.abs(stitched - single)[inner.slices()]
        assert diff.max() <= 1 / 255 + tolerance, f"tile {tile}: max probability difference {diff.max():.4f}"
        found = nuclei_inside(root["labels/nuclei/0"][:], guaranteed_only=True)
        differing = len(expected ^ found)
        assert not differing, f"tile {tile}: {differing} of {len(expected)} nuclei differ from the single pass"


def test_tiled_output_equals_single_pass(disc_checkpoint, client, tmp_path):
    """Synthetic nuclei, the default halo, two tile sizes; 48 px at the slide edge see different zero
    padding in a tile and in one pass (the background there is uniform, so that reaches no further)."""
    slide = tmp_path / "discs.svs"
    write_synthetic_slide(slide, 640, 448, mpp=MPP, levels=1, seed=7)
    halo = DEFAULT_HALO
    _check_border_contract(slide, tmp_path, disc_checkpoint, client, ((384, halo), (512, halo)), 48, 0.01)


def test_tiled_output_equals_single_pass_on_real_tissue(disc_checkpoint, client, tmp_path):
    """Real H&E (a 768-px crop of the packaged example slide), the default halo, two tile sizes: stitched
    probabilities equal one pass within 0.002 and the nuclei are the same. A 64-px halo fails here
    (0.136 at 512-px tiles): the network's context is wider than the synthetic slides show. 192 px at
    the slide edge are left out: beyond the edge a tile reads white glass where one pass pads with zeros,
    and on tissue that difference reaches as far as the network's context."""
    with openslide.OpenSlide(str(example_slide())) as example:
        mpp = float(example.properties[openslide.PROPERTY_NAME_MPP_X])
        region = np.asarray(example.read_region((700, 500), 0, (768, 768)).convert("RGB"))
    assert abs(mpp - MPP) < 0.01, "the example slide is scanned at about 0.5 um/px"
    slide = tmp_path / "tissue.svs"
    write_rgb_image(slide, region, mpp=MPP, levels=1)
    halo = DEFAULT_HALO
    _check_border_contract(slide, tmp_path, disc_checkpoint, client, ((512, halo), (640, halo)), 192, 0.002)


def test_run_end_to_end_outputs(disc_checkpoint, tmp_path):
    slide = tmp_path / "tissue.svs"
    truth = write_synthetic_slide(slide, 900, 700, mpp=0.25, levels=3, seed=3)
    out = tmp_path / "results"
    code = main(
        [
            "run",
            str(slide),
            "--out",
            str(out),
            "--weights",
            str(disc_checkpoint),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--tile-size",
            "256",
            "--halo",
            "64",
            "--quiet",
            "--set",
            "output.chunk=64",
            "tissue.thumbnail_mpp=2",
            "tissue.min_region_um2=500",
        ]
    )
    assert code == 0
    folder = out / "tissue"
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "ok" and report["model"]["trained"] is True
    n = report["counts"]["nuclei"]
    assert abs(n - len(truth["centres"])) <= 0.2 * len(truth["centres"]) + 2, (n, len(truth["centres"]))
    # OME-Zarr read back with the independent ome-zarr reader: image + labels, micrometre scales.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(folder / "tissue.ome.zarr")))())
    image_meta = nodes[0].metadata
    scales = [t[0]["scale"] for t in image_meta["coordinateTransformations"]]
    assert scales[0] == [MPP, MPP] and scales[1] == [2 * MPP, 2 * MPP]
    root = zarr.open_group(str(folder / "tissue.ome.zarr"), mode="r")
    assert root.attrs["ome"]["version"] == "0.5"
    labels = root["labels/nuclei/0"][:]
    assert labels.dtype == np.int32 and len(np.unique(labels[labels > 0])) == n
    # GeoJSON: QuPath contract, ids shared with the table and the label image.
    assert check_qupath_feature_collection(folder / "nuclei.geojson.gz") == []
    with gzip.open(folder / "nuclei.geojson.gz", "rt") as handle:
        features = json.load(handle)["features"]
    table = pq.read_table(folder / "nuclei.parquet")
    ids = sorted(table.column("id").to_pylist())
    assert len(features) == n and ids == list(range(1, n + 1))
    assert set(np.unique(labels[labels > 0]).tolist()) == set(ids)
    # Level-0 coordinates: every centroid lies on a synthetic disc (level 0 = 0.25 um/px here).
    cx, cy = np.array(table.column("centroid_x").to_pylist()), np.array(table.column("centroid_y").to_pylist())
    centres = np.asarray(truth["centres"])
    nearest = np.min(np.hypot(centres[:, 0][None] - cy[:, None], centres[:, 1][None] - cx[:, None]), axis=1)
    assert np.median(nearest) < 4, "centroids are not where the nuclei are in level-0 pixels"
    with Image.open(folder / "preview.png") as preview:
        preview.load()  # decodes completely: a truncated file fails here
        pixels = np.asarray(preview.convert("RGB"))
    assert max(pixels.shape[:2]) <= 2048 and np.ptp(pixels) > 50, "the preview should show the slide, not one colour"
    assert not list(out.glob(".*partial*")), "temporary folders were left behind"
    # A second run skips the finished slide.
    assert (
        main(
            [
                "run",
                str(slide),
                "--out",
                str(out),
                "--weights",
                str(disc_checkpoint),
                "--device",
                "cpu",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )


def test_bad_inputs_do_not_stop_the_cohort(tiny_checkpoint, shared_dir, tmp_path, capsys):
    out = tmp_path / "results"
    blank = tmp_path / "slides" / "blank.svs"
    blank.parent.mkdir()
    write_synthetic_slide(blank, 512, 512, mpp=MPP, levels=1, blank=True)
    code = main(
        [
            "run",
            str(shared_dir / "slides" / "fixtures"),
            str(blank),
            "--out",
            str(out),
            "--weights",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--tile-size",
            "256",
            "--halo",
            "64",
            "--quiet",
            "--set",
            "output.chunk=64",
        ]
    )
    assert code == 1
    summary = json.loads((out / "run_summary.json").read_text())
    status = {Path(s["slide"]).name: s for s in summary["slides"]}
    for name, words in {
        "broken.svs": "not a slide",
        "unopenable.tiff": "unsupported",
        "unreadable.svs": "cannot read",
        "boxes.tiff": "microns-per-pixel",
    }.items():
        assert status[name]["status"] == "failed" and words in status[name]["error"] and name in status[name]["error"]
        assert not (out / name.split(".")[0]).exists(), f"{name}: a failed slide left an output folder"
    assert status["blank.svs"]["status"] == "ok" and status["blank.svs"]["nuclei"] == 0
    assert check_qupath_feature_collection(out / "blank" / "nuclei.geojson.gz") == []
    assert status["small.svs"]["status"] == "ok"
    printed = capsys.readouterr().out
    assert "failed" in printed and "broken.svs" in printed


def test_unwritable_output_folder(tiny_checkpoint, tmp_path, caplog):
    """An output folder that cannot be created stops the run with its path named (root included: the
    parent is a file, which no permission bit overrides)."""
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 256, 256, mpp=MPP, levels=1)
    parent = tmp_path / "plain-file"
    parent.write_text("not a folder")
    out = parent / "r"
    assert (
        main(
            [
                "run",
                str(slide),
                "--out",
                str(out),
                "--weights",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 1
    )
    assert str(out) in caplog.text
    assert parent.read_text() == "not a folder"


def test_output_path_is_a_file(tiny_checkpoint, tmp_path, caplog):
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 256, 256, mpp=MPP, levels=1)
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    assert (
        main(
            [
                "run",
                str(slide),
                "--out",
                str(blocker),
                "--weights",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 1
    )
    assert "not writable" in caplog.text and str(blocker) in caplog.text


def test_cmu_slide_with_small_model(tiny_checkpoint, shared_dir, tmp_path):
    out = tmp_path / "cmu"
    code = main(
        [
            "run",
            str(shared_dir / "slides" / "CMU-1-Small-Region.svs"),
            "--out",
            str(out),
            "--weights",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--tile-size",
            "512",
            "--halo",
            "64",
            "--quiet",
            "--set",
            "output.chunk=128",
        ]
    )
    assert code == 0
    report = json.loads((out / "CMU-1-Small-Region" / "report.json").read_text())
    assert report["slide"]["mpp_used"] == pytest.approx(0.499, abs=1e-3)
    width, height = 2220, 2967  # level 0 of CMU-1-Small-Region, 0.499 um/px, read at the model's 0.5 um/px
    assert report["counts"]["model_shape"] == [round(height * 0.499 / 0.5), round(width * 0.499 / 0.5)]
    assert check_qupath_feature_collection(out / "CMU-1-Small-Region" / "nuclei.geojson.gz") == []


def test_failure_mid_slide_leaves_no_result(tiny_checkpoint, tmp_path):
    """A nucleus larger than the halo stops the slide loudly; nothing half-written is left behind."""
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 512, 512, mpp=MPP, levels=1)
    out = tmp_path / "results"
    # Threshold 0 makes the whole tile one object: far larger than the halo.
    code = main(
        [
            "run",
            str(slide),
            "--out",
            str(out),
            "--weights",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--tile-size",
            "256",
            "--halo",
            "32",
            "--no-tissue-detection",
            "--quiet",
            "--set",
            "postprocess.threshold=0.0",
            "postprocess.min_area_um2=0.0",
            "output.chunk=64",
        ]
    )
    assert code == 1
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["failed"] == 1 and "halo" in summary["slides"][0]["error"]
    # Only the run's bookkeeping remains: no slide folder, no temporary folder.
    assert sorted(p.name for p in out.iterdir()) == [".locks", "cohort.csv", "index.html", "run_summary.json"]
    assert not list((out / ".locks").glob("*partial*"))


@pytest.fixture(scope="module")
def gpu_client():
    """Workers that advertise the GPU resource (the model runs on them, here on their CPU)."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", resources={"GPU": 1}
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _zarr_outputs(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    root = zarr.open_group(str(folder / f"{name}.ome.zarr"), mode="r")
    return root["0"][:], root["labels/nuclei/0"][:]


def _features(folder: Path) -> list[dict]:
    with gzip.open(folder / "nuclei.geojson.gz", "rt") as handle:
        return json.load(handle)["features"]


def test_worker_backend_equals_driver_backend(disc_checkpoint, client, gpu_client, tmp_path):
    """The model on GPU-resource workers gives exactly the driver backend's outputs, for two tile sizes."""
    slide = tmp_path / "discs.svs"
    write_synthetic_slide(slide, 640, 448, mpp=MPP, levels=1, seed=7)
    bundle = load_checkpoint(disc_checkpoint)
    for tile, halo in ((256, 64), (384, 96)):
        cfg = _cfg(disc_checkpoint, tile, halo)
        driver = run_slide(
            slide,
            "discs",
            tmp_path / f"driver{tile}",
            cfg,
            bundle,
            DriverBackend(client, make_predictor(bundle, cfg.model), cfg),
            client,
            progress=False,
        )
        workers = run_slide(
            slide,
            "discs",
            tmp_path / f"workers{tile}",
            cfg,
            bundle,
            WorkerBackend(gpu_client, bundle, cfg),
            gpu_client,
            progress=False,
        )
        assert driver.status == workers.status == "ok" and driver.nuclei == workers.nuclei > 10
        report = json.loads((tmp_path / f"workers{tile}" / "discs" / "report.json").read_text())
        assert report["model"]["inference"]["backend"] == "workers"
        prob_d, labels_d = _zarr_outputs(tmp_path / f"driver{tile}" / "discs", "discs")
        prob_w, labels_w = _zarr_outputs(tmp_path / f"workers{tile}" / "discs", "discs")
        assert np.array_equal(prob_d, prob_w) and np.array_equal(labels_d, labels_w)
        assert _features(tmp_path / f"driver{tile}" / "discs") == _features(tmp_path / f"workers{tile}" / "discs")


def test_slide_rgb_in_the_zarr_is_the_slide_at_model_resolution(disc_checkpoint, client, gpu_client, tmp_path):
    """With output.slide_rgb, both backends store each tissue tile's core cut from the tile's own read
    (decoded once) and the glass tiles' cores read apart: together exactly the slide read in one box."""
    slide = tmp_path / "discs.svs"
    write_synthetic_slide(slide, 1280, 896, mpp=MPP / 2, levels=1, seed=11)  # read at 2x: the halving filter
    bundle = load_checkpoint(disc_checkpoint)
    expected = None
    for name, make_backend in (
        ("driver", lambda cfg: DriverBackend(client, make_predictor(bundle, cfg.model), cfg)),
        ("workers", lambda cfg: WorkerBackend(gpu_client, bundle, cfg)),
    ):
        cfg = load_config(
            None,
            [
                {
                    "model": {"weights": str(disc_checkpoint), "device": "cpu", "amp": "fp32", "tta": "none"},
                    "tiling": {"tile_size": 256, "halo": 64},
                    "output": {"chunk": 64, "pyramid_levels": 2, "slide_rgb": True},
                }
            ],
        )
        active = gpu_client if name == "workers" else client
        result = run_slide(slide, "discs", tmp_path / name, cfg, bundle, make_backend(cfg), active, progress=False)
        assert result.status == "ok" and result.nuclei > 10
        plan = json.loads((tmp_path / name / "discs" / "plan.json").read_text())
        assert 0 < len(plan["tissue_tiles"]), "want tiles with tissue"
        image, _ = _zarr_outputs(tmp_path / name / "discs", "discs")
        if expected is None:
            reader = SlideReader(slide, MPP)
            expected = np.moveaxis(reader.read(Box(0, 0, *reader.model_shape)), -1, 0)
        assert image.shape[0] == 4
        np.testing.assert_array_equal(image[1:], expected)


def test_tile_order_does_not_change_ids_or_outputs(disc_checkpoint, client, tmp_path):
    """Tiles finishing in another order give the same label image, ids, GeoJSON and table."""
    slide = tmp_path / "discs.svs"
    write_synthetic_slide(slide, 640, 448, mpp=MPP, levels=1, seed=7)
    bundle = load_checkpoint(disc_checkpoint)
    cfg = _cfg(disc_checkpoint, 256, 64)
    predictor = make_predictor(bundle, cfg.model)
    backend = DriverBackend(client, predictor, cfg)
    in_order = run_slide(slide, "discs", tmp_path / "ordered", cfg, bundle, backend, client, progress=False)
    work = prepare_slide(slide, "discs", tmp_path / "shuffled", cfg, bundle)
    tiles = work.plan.tiles_to_run()
    assert len(tiles) >= 4
    order = np.random.default_rng(3).permutation(len(tiles))
    results = []
    for k in order:
        outputs = predictor.predict(read_tile(work.plan.reader_args(), tiles[k])[None])
        results.append(process_tile(work.ctx, tiles[k], *tile_maps(outputs, 0)))
    work.tile_run = TileRun(results, [], {})
    shuffled = finish_slide(work, client, cfg, bundle, backend)
    assert shuffled.nuclei == in_order.nuclei > 10
    a, b = tmp_path / "ordered" / "discs", tmp_path / "shuffled" / "discs"
    assert np.array_equal(_zarr_outputs(a, "discs")[1], _zarr_outputs(b, "discs")[1])
    assert _features(a) == _features(b)
    assert pq.read_table(a / "nuclei.parquet").equals(pq.read_table(b / "nuclei.parquet"))


def test_driver_blocks_instead_of_spinning(tiny_checkpoint, client, tmp_path):
    """With the in-flight bound taken by post-processing, the driver waits for a task instead of looping."""
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 512, 512, mpp=MPP, levels=1)
    bundle = load_checkpoint(tiny_checkpoint)
    cfg = _cfg(tiny_checkpoint, 256, 64, cluster={"tiles_in_flight": 1}, tissue={"enabled": False})
    backend = DriverBackend(client, make_predictor(bundle, cfg.model), cfg)
    result = run_slide(slide, "s", tmp_path / "out", cfg, bundle, backend, client, progress=False)
    assert result.status == "ok" and result.tiles == 16  # 512 px, cores of 128 px
    wakeups = json.loads((tmp_path / "out" / "s" / "report.json").read_text())["timings"]["driver_wakeups"]
    assert wakeups <= 3 * result.tiles + 2, f"{wakeups} driver loop turns for {result.tiles} tiles"


def test_same_stems_in_one_run_get_their_own_outputs(tiny_checkpoint, tmp_path):
    """a/x.svs, b/x.svs, x.svs and x.v2.svs: four slides, four result folders, nothing skipped."""
    root = tmp_path / "slides"
    for rel in ("a/x.svs", "b/x.svs", "x.svs", "x.v2.svs"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_slide(root / rel, 256, 256, mpp=MPP, levels=1, seed=len(rel))
    out = tmp_path / "results"
    code = main(
        [
            "run",
            str(root),
            "--out",
            str(out),
            "--weights",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--tile-size",
            "256",
            "--halo",
            "64",
            "--quiet",
            "--no-tissue-detection",
            "--set",
            "output.chunk=64",
        ]
    )
    assert code == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert [s["status"] for s in summary["slides"]] == ["ok"] * 4
    assert sorted(summary["outputs"]) == ["a/x", "b/x", "x", "x.v2"]
    for name, slide in summary["outputs"].items():
        report = json.loads((out / name / "report.json").read_text())
        assert report["slide"]["path"] == str(Path(slide).resolve()) and report["name"] == name


def test_a_folder_holding_another_slides_results_is_an_error(tiny_checkpoint, tmp_path):
    out = tmp_path / "results"
    first, second = tmp_path / "one" / "x.svs", tmp_path / "two" / "x.svs"
    for k, slide in enumerate((first, second)):
        slide.parent.mkdir()
        write_synthetic_slide(slide, 256, 256, mpp=MPP, levels=1, seed=k)
    args = [
        "--out",
        str(out),
        "--weights",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--tile-size",
        "256",
        "--halo",
        "64",
        "--quiet",
        "--set",
        "output.chunk=64",
    ]
    assert main(["run", str(first), *args]) == 0
    before = (out / "x" / "report.json").read_text()
    assert main(["run", str(second), *args]) == 1  # same output name, another slide: never skipped or mixed
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["slides"][0]["status"] == "failed" and "another slide" in summary["slides"][0]["error"]
    assert (out / "x" / "report.json").read_text() == before


def _slow_write(path: str, seconds: float) -> None:
    import time

    time.sleep(seconds)
    Path(path).write_text("late")


def test_stopping_a_slide_waits_for_its_writing_tasks(client, tmp_path):
    """A running task cannot be interrupted, so a failed slide waits for its writers before its folder
    is removed: nothing is written into (or recreates) the folder afterwards."""
    from wsi_grunet.inference import TaskLedger

    ledger = TaskLedger()
    folder = tmp_path / ".s.partial-1"
    folder.mkdir()
    ledger.writing.append(client.submit(_slow_write, str(folder / "late.txt"), 1.5, pure=False))
    ledger.stop(client)
    assert (folder / "late.txt").read_text() == "late", "stop returned before the writing task finished"
    import shutil
    import time

    shutil.rmtree(folder)
    time.sleep(2.0)
    assert not folder.exists()
