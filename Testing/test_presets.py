"""Presets, overrides and ``dagman config``: every method, baseline and ablation from one configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from dagman_core.config import ConfigError, load_config, mask_grid_tokens, preset_names

from conftest import LUNG2_TUMOR_BLOCK

PRESETS = [
    "attmask", "dagman_swin", "dagman_vit", "ibot", "mst", "no_aitd", "no_amip", "no_ampd", "no_gitd",
    "nt_only", "paper_swin", "sa_only", "smit", "tiny_cpu",
]

# Shrinks any preset to CPU test size while keeping its method switches.
TINY = [
    "model.embed_dim=12", "model.depths=[1, 1, 2, 1]", "model.num_heads=[1, 2, 4, 8]", "model.sa_heads=4",
    "model.vit_width=48", "model.vit_depth=4", "model.vit_heads=4",
    "data.crop_size=64", "finetune.crop_size=64",
    "loss.out_dim=256", "loss.head_hidden_dim=64", "loss.head_bottleneck_dim=32",
    "train.batch_size=1", "train.lr_reference_batch=1",
]


def dagman(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dagman_train.cli", *arguments], capture_output=True, text=True, timeout=600)


def test_shipped_presets_are_documented():
    assert preset_names() == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_resolves(preset):
    config = load_config(preset)

    assert config.name == preset
    assert mask_grid_tokens(config) == (512 if preset != "tiny_cpu" else 64)


def test_baselines_differ_by_switches_only():
    reference = load_config("dagman_swin").to_dict()
    expected = {
        "smit": {("masking", "mode"): "random", ("masking", "noisy_teacher"): False},
        "ibot": {("masking", "mode"): "block", ("masking", "noisy_teacher"): False},
        "attmask": {("masking", "mode"): "attention_high", ("masking", "noisy_teacher"): False},
        "mst": {("masking", "mode"): "attention_low", ("masking", "noisy_teacher"): False},
        "sa_only": {("masking", "noisy_teacher"): False},
        "nt_only": {("masking", "mode"): "random"},
        "no_amip": {("loss", "amip"): False},
        "no_ampd": {("loss", "ampd"): False},
        "no_aitd": {("loss", "aitd"): False},
        "no_gitd": {("loss", "gitd"): False},
        "dagman_vit": {("model", "backbone"): "vit"},
        "paper_swin": {},
    }
    for preset, switches in expected.items():
        values = load_config(preset).to_dict()
        differences = {
            (section, key): value
            for section, items in values.items() if isinstance(items, dict)
            for key, value in items.items() if reference[section][key] != value
        }
        assert differences == switches, preset


def test_overrides_change_single_keys(tmp_path):
    extra = tmp_path / "ratio.yaml"
    extra.write_text("masking:\n  ratio: 0.5\n  hints: sampled\n")

    config = load_config("dagman_swin", extra, overrides=["masking.ratio=0.6", "loss.heads=shared"])

    assert (config.masking.ratio, config.masking.hints, config.loss.heads) == (0.6, "sampled", "shared")
    assert config.masking.mode == "attention"
    assert config.model.depths == (2, 2, 8, 2)


def test_later_preset_adds_only_its_own_keys():
    config = load_config("smit", "tiny_cpu")

    assert config.masking.mode == "random"
    assert config.masking.noisy_teacher is False
    assert config.model.embed_dim == 12
    assert config.data.crop_size == 64
    assert config.name == "smit+tiny_cpu"


@pytest.mark.parametrize(
    "override, message",
    [
        ("masking.mode=blocks", "valid choices: ['attention', 'random', 'block', 'attention_high', 'attention_low']"),
        ("masking.attention_source=ema", "valid choices: ['noisy_teacher', 'clean_teacher', 'student']"),
        ("masking.teacher_dropout_grid=voxel", "valid choices: ['patch', 'cell']"),
        ("model.sa_stage=5", "valid choices: [1, 2, 3, 4]"),
        ("loss.heads=tied", "valid choices: ['separate', 'shared']"),
        ("masking.ratio=1.2", "must lie in [0, 1)"),
        ("masking.maskratio=0.5", "valid keys:"),
        ("masking.noisy_teacher=maybe", "must be of type bool"),
    ],
)
def test_invalid_override_names_choices(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("dagman_swin", overrides=[override])

    assert message in str(error.value)


def test_all_loss_terms_off_is_rejected():
    with pytest.raises(ConfigError, match="keep at least one"):
        load_config("tiny_cpu", overrides=[f"loss.{term}=false" for term in ("amip", "ampd", "aitd", "gitd")])


def test_config_json_reports_paper_swin_sizes():
    process = dagman("config", "paper_swin", "--json")

    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout)
    assert report["parameters"]["backbone"] == 10_571_872
    assert report["mask_grid_tokens"] == 512
    parts = report["parameters"]
    assert parts["total"] > parts["backbone"] + parts["sa_block"] + parts["heads"] + parts["reconstruction_head"]


def test_config_json_counts_vit():
    report = json.loads(dagman("config", "dagman_vit", "--json").stdout)

    # Patch embedding 16^3 x 768 + 768, position embedding 512 x 768, [CLS] 768, final norm 2 x 768.
    # Each block: qkv 768 x 2304 + 2304, projection 768^2 + 768, MLP 768 x 3072 + 3072 + 3072 x 768 + 768,
    # two norms 4 x 768: 7,087,872.
    per_block = 768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 4 * 768
    expected = 16**3 * 768 + 768 + 512 * 768 + 768 + 2 * 768 + 12 * per_block
    assert report["parameters"]["backbone"] == expected == 88_596_480
    assert report["parameters"]["sa_block"] == 0
    assert report["mask_grid_tokens"] == 512


def test_config_rejects_unknown_preset():
    process = dagman("config", "dagman_swim")

    assert process.returncode == 1
    assert "unknown preset 'dagman_swim'" in process.stderr
    assert "dagman_swin" in process.stderr


def test_shared_heads_have_fewer_parameters():
    from dagman_core.codistillation import parameter_counts

    separate = parameter_counts(load_config("tiny_cpu"))
    shared = parameter_counts(load_config("tiny_cpu", overrides=["loss.heads=shared"]))
    no_aitd = parameter_counts(load_config("tiny_cpu", overrides=["loss.aitd=false"]))

    # Swin: [CLS] and patch tokens share one head and the wider stage-4 global tokens keep their own,
    # which leaves the same two heads as dropping the [CLS] head.
    assert shared["heads"] == no_aitd["heads"] < separate["heads"]
    assert shared["backbone"] == separate["backbone"]


@pytest.fixture(scope="module")
def block_datalist(ct_data: Path, tmp_path_factory) -> Path:
    """A datalist of one real CT block (lung2 around its tumor), small enough for two quick steps."""
    folder = tmp_path_factory.mktemp("presets")
    image = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / "lung2_image.nrrd"))
    sitk.WriteImage(image[LUNG2_TUMOR_BLOCK], str(folder / "block.nrrd"))
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "block.nrrd"}]}))
    return datalist


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_pretrains_two_steps(preset, block_datalist: Path, tmp_path: Path):
    from dagman_train.pretrain import pretrain

    config = load_config(preset, overrides=TINY)
    summary = pretrain(config, block_datalist, tmp_path / preset, max_steps=2, show_progress=False)

    records = [json.loads(line) for line in (tmp_path / preset / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2
    assert len(records) == 2
    terms = {"amip", "ampd", "aitd", "gitd"}
    enabled = {term for term in terms if getattr(config.loss, term)}
    assert terms & set(records[-1]) == enabled
    assert all(record["skipped"] is False for record in records)
    assert (tmp_path / preset / "encoder.safetensors").stat().st_size > 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["masking.attention_source=clean_teacher"],
        ["masking.attention_source=student"],
        ["masking.teacher_dropout_grid=cell"],
        ["masking.hints=sampled"],
        ["loss.heads=shared"],
        ["model.sa_stage=1"],
        ["model.sa_stage=2"],
        ["model.sa_stage=4"],
        ["model.backbone=vit", "loss.heads=shared", "masking.attention_source=student"],
        ["loss.ampd=false", "loss.aitd=false", "loss.gitd=false"],
        ["train.precision=bf16", "train.checkpoint_activations=true"],
        ["model.backbone=vit", "train.checkpoint_activations=true"],
    ],
    ids=lambda overrides: ",".join(overrides),
)
def test_each_option_pretrains_two_steps(overrides, block_datalist: Path, tmp_path: Path):
    from dagman_train.pretrain import pretrain

    config = load_config("tiny_cpu", overrides=[*TINY, *overrides])
    summary = pretrain(config, block_datalist, tmp_path / "run", max_steps=2, show_progress=False)

    assert summary["steps"] == 2
    assert summary["skipped_nonfinite_steps"] == 0
    assert 0.0 < summary["final"]["masked_fraction"] < 1.0


@pytest.mark.parametrize("stage, cells, width", [(1, 16, 24), (2, 8, 48), (3, 4, 96), (4, 2, 192)])
def test_sa_stage_sets_token_grid_and_width(stage, cells, width):
    import torch

    from dagman_core.config import cell_voxels
    from dagman_core.models.encoder import DAGMaNEncoder

    config = load_config("tiny_cpu", overrides=[f"model.sa_stage={stage}"])
    encoder = DAGMaNEncoder(config).eval()
    with torch.no_grad():
        encoded = encoder(torch.rand(1, 1, 64, 64, 64))

    # tiny_cpu: patch 2, embed 12, so stage s has tokens of 2 * 2^s voxels and 12 * 2^s channels.
    assert cell_voxels(config) == 64 // cells
    assert encoded["patch_tokens"].shape == (1, cells**3, width)
    assert encoded["s_att"].shape == (1, cells**3)
    assert mask_grid_tokens(config) == cells**3


def test_nonfinite_run_stops_with_summary(block_datalist: Path, tmp_path: Path):
    from dagman_train.pretrain import NonFiniteLossError, pretrain

    # A learning rate of 1e30 turns the weights to inf after the first step, so every later loss is NaN.
    config = load_config("tiny_cpu", overrides=[*TINY, "train.lr=1e30", "train.warmup_epochs=0", "train.max_nonfinite_steps=2"])
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        pretrain(config, block_datalist, tmp_path / "run", max_steps=6, show_progress=False)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["skipped"] for record in records] == [False, True, True]
    assert records[-1]["loss"] is None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 2
    assert "2 steps in a row" in summary["stopped"]
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_failed_start_leaves_no_run_folder(tmp_path: Path):
    from dagman_train.pretrain import pretrain

    with pytest.raises(FileNotFoundError, match="datalist not found"):
        pretrain(load_config("tiny_cpu"), tmp_path / "missing.json", tmp_path / "run", max_steps=1, show_progress=False)

    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.hu_window=[x, 1]", "data.hu_window item must be a number, got 'x'"),
        ("model.depths=[a, b, c, d]", "model.depths item must be of type int"),
        ("loss.out_dim=0", "loss.out_dim 0 must be positive"),
        ("train.batch_size=true", "train.batch_size must be a number, got True"),
        ("train.epochs=-5", "train.epochs -5 must be positive"),
    ],
)
def test_nonsense_values_are_rejected(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("tiny_cpu", overrides=[override])

    assert message in str(error.value)


def test_exponent_without_dot_reads_as_float(tmp_path: Path):
    extra = tmp_path / "lr.yaml"
    extra.write_text("train:\n  lr: 3e-4\n")

    assert load_config("tiny_cpu", extra).train.lr == 3e-4
    assert load_config("tiny_cpu", overrides=["train.lr=1e-4"]).train.lr == 1e-4


def test_invalid_yaml_names_the_file(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("masking: [\n")

    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config("tiny_cpu", broken)


def test_folder_named_like_preset_is_ignored(tmp_path: Path, monkeypatch):
    (tmp_path / "tiny_cpu").mkdir()
    monkeypatch.chdir(tmp_path)

    assert load_config("tiny_cpu").name == "tiny_cpu"
