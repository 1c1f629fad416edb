"""Configuration: the packaged YAML files equal the dataclass defaults, and every key is validated
(type, range, allowed values, cross-field rules) when loaded, with errors that name the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Literal

import pytest

from wsi_grunet import config as config_module
from wsi_grunet.config import (
    ConfigError,
    RunConfig,
    SlurmOptions,
    TrainConfig,
    build_dataclass,
    load_config,
    load_train_config,
    option,
    parse_override,
    yaml_load,
)

CONFIGS = Path(config_module.__file__).resolve().parent.parent / "configs"


def _set(*texts: str) -> list[dict]:
    return [parse_override(t) for t in texts]


def _assert_yaml_equals_defaults(data: dict, cls: type, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    assert list(data) == names, f"{where}: keys differ from {cls.__name__} (missing or extra, or out of order)"
    built, default = build_dataclass(cls, data), cls()
    for name in names:
        assert getattr(built, name) == getattr(default, name), f"{where}.{name}: YAML differs from the dataclass"


def test_packaged_yaml_spells_out_exactly_the_dataclass_defaults():
    run = yaml_load((CONFIGS / "default.yaml").read_text())
    sections = [f for f in dataclasses.fields(RunConfig) if f.name != "slurm"]  # slurm: its own file
    assert list(run) == [f.name for f in sections]
    for section in sections:
        _assert_yaml_equals_defaults(run[section.name], typing.get_type_hints(RunConfig)[section.name], section.name)
    _assert_yaml_equals_defaults(yaml_load((CONFIGS / "cluster" / "slurm.yaml").read_text()), SlurmOptions, "slurm")
    _assert_yaml_equals_defaults(yaml_load((CONFIGS / "train.yaml").read_text()), TrainConfig, "train")
    # and loading them gives the defaults
    assert load_config() == RunConfig()
    assert load_train_config() == TrainConfig()


def test_schema_defaults_named_by_the_team():
    cfg = load_config()
    assert (cfg.model.amp, cfg.model.channels_last, cfg.model.threads, cfg.model.tta, cfg.model.backend) == (
        "auto",
        "auto",
        None,
        "auto",
        "driver",
    )
    assert cfg.cluster.kind == "local" and cfg.cluster.scheduler is None
    assert cfg.output.formats == ("zarr", "geojson", "parquet", "preview") and cfg.output.slide_rgb is False
    assert dataclasses.asdict(cfg.slurm) == {
        "partition": None,
        "account": None,
        "walltime": "01:00:00",
        "cores": 2,
        "memory": "4GB",
        "processes": 1,
        "gpus_per_job": 0,
        "jobs_min": 0,
        "jobs_max": 4,
        "prologue": (),
        "job_extra_directives": (),
        "log_directory": None,
        "local_directory": None,
        "python": None,
    }
    train = load_train_config()
    assert (
        train.schedule,
        train.lr_min,
        train.step_gamma,
        train.step_every,
        train.select_by,
        train.amp,
        train.channels_last,
        train.threads,
        train.init_weights,
    ) == ("cosine", 1e-6, 0.1, 5000, "aji", "auto", "auto", None, None)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.amp=fp33", "model.amp: 'fp33' is not one of auto, bf16, fp16, fp32"),
        ("model.tta=all", "model.tta: 'all' is not one of auto, none, flips, rot4, dihedral"),
        ("model.backend=gpu", "model.backend: 'gpu' is not one of driver, workers"),
        ("model.channels_last=maybe", "model.channels_last: 'maybe' is not one of true, false, auto"),
        ("model.device=gpu", "model.device: 'gpu' is not a device; allowed: auto, cpu, cuda or cuda:N"),
        ("model.batch_size=0", "model.batch_size: 0 is out of range; allowed: an integer >= 1"),
        ("model.batch_size=2.5", "model.batch_size: 2.5 is not an integer"),
        ("model.threads=0", "model.threads: 0 is out of range; allowed: an integer >= 1"),
        ("slide.mpp=0", "slide.mpp: 0.0 is outside 0.1-2 um/px, where nuclei can be resolved"),
        ("tiling.halo=10", "tiling.halo: 10 is out of range; allowed: an integer >= 0 and a multiple of 16"),
        ("tissue.enabled=maybe", "tissue.enabled: 'maybe' is not one of true, false"),
        ("postprocess.threshold=1.0", "postprocess.threshold: 1.0 is out of range; allowed: a number >= 0 and < 1"),
        ("cluster.kind=pbs", "cluster.kind: 'pbs' is not one of local, slurm"),
        ("cluster.workers=0", "cluster.workers: 0 is out of range; allowed: an integer >= 1"),
        ("cluster.workers=two", "cluster.workers: 'two' is not an integer"),
        ("cluster.scheduler=localhost", "cluster.scheduler: 'localhost' is not a scheduler address"),
        ("cluster.scheduler=http://host:8786", "cluster.scheduler: 'http://host:8786' is not a scheduler address"),
        ("output.chunk=0", "output.chunk: 0 is out of range; allowed: an integer >= 16 and a multiple of 16"),
        ("output.chunk=100", "output.chunk: 100 is out of range"),
        ("output.formats=[zarr,png]", "output.formats[1]: 'png' is not one of zarr, geojson, parquet, preview"),
        ("output.formats=[]", "output.formats: [] needs at least 1 item(s)"),
        ("output.formats=[zarr,zarr]", "output.formats: ['zarr', 'zarr'] names an item twice"),
        ("slurm.cores=0", "slurm.cores: 0 is out of range"),
        ("slurm.walltime=soon", "slurm.walltime: 'soon' is not a SLURM walltime"),
        ("slurm.memory=lots", "slurm.memory: 'lots' is not an amount of memory"),
        ("slurm.prologue=5", "slurm.prologue: 5 is not a list of a string"),
    ],
)
def test_bad_values_are_rejected_naming_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, _set(override))
    assert str(info.value).startswith(message), str(info.value)
    assert str(info.value).endswith(f"(set by --set {override})")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tiling.tile_size=128", "tiling.halo=64"], "tiling.tile_size: 128 leaves no tile core with tiling.halo 64"),
        (["tiling.tile_size=576", "output.chunk=128"], "output.chunk: 128 does not divide the tile core 320"),
        (["output.chunk=192"], "output.chunk: 192 does not divide the tile core 896"),
        (["slurm.jobs_min=5", "slurm.jobs_max=2"], "slurm.jobs_min: 5 exceeds slurm.jobs_max 2"),
        (["slurm.processes=4"], "slurm.processes: 4 exceeds slurm.cores 2"),
        (["slurm.gpus_per_job=4"], "slurm.gpus_per_job: 4 needs at least as many slurm.cores"),
        (["output.slide_rgb=true", "output.formats=[geojson]"], "output.slide_rgb: true needs zarr in output.formats"),
        (["cluster.kind=slurm", "cluster.scheduler=tcp://h:8786"], "cluster.scheduler: an existing scheduler and"),
    ],
)
def test_cross_field_rules_are_checked_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, _set(*overrides))


def test_chunk_error_suggests_a_chunk_that_fits():
    with pytest.raises(ConfigError, match=r"allowed: auto \(here 320\) or a multiple of 16 dividing 320"):
        load_config(None, _set("tiling.tile_size=576", "output.chunk=128"))
    cfg = load_config(None, _set("tiling.tile_size=576", "output.chunk=160"))
    assert (cfg.tiling.core, cfg.output.chunk, cfg.zarr_chunk) == (320, 160, 160)


@pytest.mark.parametrize(
    ("tile_size", "halo", "chunk"),
    [(1152, 128, 448), (576, 128, 320), (1280, 128, 512), (1536, 128, 320), (512, 96, 320), (160, 64, 32)],
)
def test_auto_chunk_is_the_largest_multiple_of_16_dividing_the_core_up_to_512(tile_size, halo, chunk):
    cfg = load_config(None, _set(f"tiling.tile_size={tile_size}", f"tiling.halo={halo}"))
    core = tile_size - 2 * halo
    assert cfg.output.chunk == "auto" and cfg.zarr_chunk == chunk
    assert core % chunk == 0 and chunk % 16 == 0 and chunk <= 512
    assert not any(core % c == 0 for c in range(chunk + 16, min(core, 512) + 1, 16))


def test_good_values_are_coerced_to_the_field_types():
    cfg = load_config(
        None,
        _set(
            "model.amp=fp32",
            "model.channels_last=auto",
            "model.threads=3",
            "model.device=cuda:1",
            "slide.mpp=1",
            "output.formats=zarr,parquet",
            "slurm.prologue=[module load cuda, source env/bin/activate]",
            "cluster.scheduler=tcp://10.0.0.1:8786",
            "slurm.walltime=1-12:00:00",
            "slurm.memory=16 GiB",
        ),
    )
    model = cfg.model
    assert (model.amp, model.channels_last, model.threads, model.device) == ("fp32", "auto", 3, "cuda:1")
    assert cfg.slide.mpp == 1.0 and isinstance(cfg.slide.mpp, float)
    assert cfg.output.formats == ("zarr", "parquet")
    assert cfg.slurm.prologue == ("module load cuda", "source env/bin/activate")
    assert (cfg.cluster.scheduler, cfg.slurm.walltime, cfg.slurm.memory) == (
        "tcp://10.0.0.1:8786",
        "1-12:00:00",
        "16 GiB",
    )
    for address in ("tls://host:8786", "ucx://host:8786", "scheduler.example:8786", "[::1]:8786"):
        assert load_config(None, _set(f"cluster.scheduler='{address}'")).cluster.scheduler == address
    assert load_config(None, _set("model.threads=null")).model.threads is None


def test_yaml_words_are_read_by_the_key_they_belong_to(tmp_path):
    """YAML 1.1 turns off/on/yes/no into booleans and 12:00:00 into 43200; here only true/false are
    booleans, so a bool key still accepts the words, a choice key does not silently become false, and a
    walltime stays text."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "output:\n  overwrite: on\n  slide_rgb: yes\nmodel:\n  channels_last: off\nslurm:\n  walltime: 12:00:00\n"
    )
    cfg = load_config(path)
    assert cfg.output.overwrite is True and cfg.output.slide_rgb is True and cfg.model.channels_last is False
    assert cfg.slurm.walltime == "12:00:00"
    path.write_text("model:\n  amp: off\n")
    with pytest.raises(ConfigError, match=rf"^model\.amp: 'off' is not one of auto, bf16, fp16, fp32 \(set in {path}"):
        load_config(path)
    train = load_train_config(None, _set("lr_min=1e-7", "lr=3e-4"))  # YAML 1.1 would read 1e-7 as text
    assert (train.lr_min, train.lr) == (1e-7, 3e-4)


def test_a_config_file_merges_over_the_defaults_and_keeps_the_rest(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(
        "model:\n  batch_size: 2\nslurm:\n  partition: gpu\n  gpus_per_job: 1\n  job_extra_directives: ['--qos=long']\n"
    )
    cfg = load_config(path, _set("slurm.account=lab"))
    assert cfg.model.batch_size == 2 and cfg.model.amp == "auto" and cfg.tiling == RunConfig().tiling
    assert (cfg.slurm.partition, cfg.slurm.gpus_per_job, cfg.slurm.account) == ("gpu", 1, "lab")
    assert cfg.slurm.job_extra_directives == ("--qos=long",) and cfg.slurm.walltime == "01:00:00"


def test_unknown_keys_and_sections_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) tiling\.tile_sise; known keys of tiling: tile_size"):
        load_config(None, _set("tiling.tile_sise=512"))
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) modle; known keys: model, slide"):
        load_config(None, _set("modle.amp=fp32"))
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) slurm\.queue"):
        load_config(None, _set("slurm.queue=gpu"))
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) schedul"):
        load_train_config(None, _set("schedul=cosine"))
    path = tmp_path / "flat.yaml"
    path.write_text("model: fast\n")
    with pytest.raises(ConfigError, match=rf"^model: expected a mapping of keys, got 'fast' \(set in {path}\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule=cosin", "schedule: 'cosin' is not one of constant, cosine, step"),
        ("select_by=pq", "select_by: 'pq' is not one of aji, dice, soft_dice"),
        ("amp=off", "amp: 'off' is not one of auto, bf16, fp16, fp32"),
        ("lr_min=-1", "lr_min: -1.0 is out of range; allowed: a number >= 0"),
        ("step_gamma=0", "step_gamma: 0.0 is out of range; allowed: a number > 0 and <= 1"),
        ("step_gamma=1.5", "step_gamma: 1.5 is out of range"),
        ("step_every=0", "step_every: 0 is out of range; allowed: an integer >= 1"),
        ("threads=0", "threads: 0 is out of range"),
        ("crop=100", "crop: 100 is out of range; allowed: an integer >= 32 and a multiple of 16"),
        ("init_weights=''", "init_weights: '' is empty"),
        ("lr_min=0.01", "lr_min: 0.01 exceeds lr 0.0001"),
        ("device=gpu", "device: 'gpu' is not a device"),
    ],
)
def test_train_config_is_validated(override, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(None, _set(override))
    assert str(info.value).startswith(message), str(info.value)


def test_train_config_accepts_the_new_keys(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "schedule: step\nstep_gamma: 0.5\nstep_every: 100\nselect_by: soft_dice\namp: bf16\n"
        "channels_last: true\nthreads: 2\ninit_weights: packaged\n"
    )
    cfg = load_train_config(path)
    assert (
        cfg.schedule,
        cfg.step_gamma,
        cfg.step_every,
        cfg.select_by,
        cfg.amp,
        cfg.channels_last,
        cfg.threads,
        cfg.init_weights,
    ) == ("step", 0.5, 100, "soft_dice", "bf16", True, 2, "packaged")
    # constant and step ignore lr_min, so it may exceed lr there
    assert load_train_config(None, _set("schedule=constant", "lr_min=0.01")).lr_min == 0.01


def test_the_mechanism_supports_lists_literals_ranges_and_unions():
    @dataclasses.dataclass(frozen=True)
    class Example:
        names: list[str] = dataclasses.field(default_factory=list)
        pair: tuple[int, ...] = ()
        level: Literal[1, 2, 3] = 1
        ratio: float = option(0.5, gt=0, lt=1)
        mode: bool | Literal["auto"] = "auto"
        limit: int | None = option(None, min=10, max=20)

    assert build_dataclass(Example, {"names": "a, b", "pair": [1, 2]}) == Example(names=["a", "b"], pair=(1, 2))
    assert build_dataclass(Example, {"level": 3, "ratio": 0.25, "mode": "on", "limit": 20}) == Example(
        level=3, ratio=0.25, mode=True, limit=20
    )
    for data, message in [
        ({"names": [1]}, "names[0]: 1 is not a string"),
        ({"pair": [1, "x"]}, "pair[1]: 'x' is not an integer"),
        ({"level": 4}, "level: 4 is not one of 1, 2, 3"),
        ({"level": "1"}, "level: '1' is not one of 1, 2, 3"),
        ({"ratio": 1}, "ratio: 1.0 is out of range; allowed: a number > 0 and < 1"),
        ({"ratio": float("nan")}, "ratio: nan is not allowed"),
        ({"ratio": True}, "ratio: true is not a number"),
        ({"mode": 1}, "mode: 1 is not one of true, false, auto"),
        ({"limit": 9}, "limit: 9 is out of range; allowed: an integer >= 10 and <= 20"),
        ({"limit": "x"}, "limit: 'x' is not an integer or null"),
    ]:
        with pytest.raises(ConfigError) as info:
            build_dataclass(Example, data)
        assert str(info.value).startswith(message), (data, str(info.value))


def test_override_syntax_errors_are_config_errors():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("model.amp")
    with pytest.raises(ConfigError, match="is not a dotted key"):
        parse_override("model..amp=fp32")
    with pytest.raises(ConfigError, match="the value is not valid YAML"):
        parse_override("slurm.prologue=[unclosed")


def test_bad_or_missing_config_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read config file"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    with pytest.raises(ConfigError, match=rf"^{broken}: not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n")
    with pytest.raises(ConfigError, match=rf"^{listed}: a config file must hold a mapping"):
        load_config(listed)
