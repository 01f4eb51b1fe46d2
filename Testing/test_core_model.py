"""Backbone sizes, the SA block's S_ATT and the AMIP head."""

import math

import pytest
import torch

from dagman_core.config import load_config
from dagman_core.models.encoder import DAGMaNEncoder
from dagman_core.models.heads import ReconstructionHead
from dagman_core.models.semantic_attention import SemanticAttention


def test_paper_swin_stage_shapes_at_128():
    config = load_config("paper_swin")
    encoder = DAGMaNEncoder(config, drop_path=0.0).eval()
    with torch.no_grad():
        outputs = encoder(torch.zeros(1, 1, 128, 128, 128))

    shapes = [tuple(stage.shape[1:]) for stage in outputs["stages"]]
    assert shapes[0] == (48, 64, 64, 64)
    assert shapes[1] == (96, 32, 32, 32)
    assert shapes[2] == (192, 16, 16, 16)
    assert shapes[3] == (384, 8, 8, 8)
    assert shapes[4] == (768, 4, 4, 4)
    assert outputs["patch_tokens"].shape == (1, 512, 384)
    assert outputs["cls"].shape == (1, 384)
    assert outputs["global_tokens"].shape == (1, 768)


def test_paper_swin_backbone_parameter_count():
    encoder = DAGMaNEncoder(load_config("paper_swin"))
    assert sum(parameter.numel() for parameter in encoder.backbone.swin.parameters()) == 10_571_872


def test_s_att_shape_range_and_sum():
    torch.manual_seed(0)
    block = SemanticAttention(dim=32, grid=(4, 4, 4), depth=2, num_heads=4)
    s_att = block(torch.randn(3, 32, 4, 4, 4))["s_att"]

    assert s_att.shape == (3, 64)
    assert bool((s_att >= 0).all())
    row_sums = s_att.sum(dim=1)
    assert bool((row_sums <= 1.0 + 1e-6).all())
    # The [CLS] column is dropped without renormalisation, so each row sums to less than 1.
    assert bool((row_sums < 1.0).all())


def test_s_att_matches_equation_one():
    torch.manual_seed(1)
    block = SemanticAttention(dim=8, grid=(2, 2, 2), depth=1, num_heads=2).eval()
    features = torch.randn(1, 8, 2, 2, 2)
    s_att = block(features)["s_att"]

    tokens = (features + block.position_embedding).flatten(2).transpose(1, 2)
    tokens = torch.cat([block.cls_token, tokens], dim=1)
    attention = block.blocks[0].attention
    normed = block.blocks[0].norm1(tokens)
    query, key, _ = attention.qkv(normed).reshape(1, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = (query[:, :, 0:1] @ key.transpose(-2, -1) / math.sqrt(4)).softmax(-1)[:, :, 0]
    expected = weights.mean(dim=1)[:, 1:]
    torch.testing.assert_close(s_att, expected, rtol=1e-5, atol=1e-6)


def test_position_embedding_resized_for_other_grid():
    block = SemanticAttention(dim=24, grid=(4, 4, 4), depth=1, num_heads=2)
    outputs = block(torch.randn(1, 24, 6, 6, 6))
    assert outputs["s_att"].shape == (1, 216)


def test_reconstruction_head_pixel_shuffle_layout():
    head = ReconstructionHead(in_dim=2, scale=2)
    with torch.no_grad():
        head.projection.weight.zero_()
        head.projection.bias.copy_(torch.arange(8, dtype=torch.float32))
    output = head(torch.zeros(1, 2, 1, 1, 1))
    assert output.shape == (1, 1, 2, 2, 2)
    # Output channel (a, b, c) of the token lands on voxel (a, b, c) of its block.
    assert output[0, 0, 1, 0, 1].item() == pytest.approx(5.0)
    assert output[0, 0, 0, 1, 1].item() == pytest.approx(3.0)


def test_bundle_refuses_to_replace_other_folder(tmp_path):
    from dagman_core.bundle import BundleError, load_bundle, write_random_bundle

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not empty"):
        write_random_bundle(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"

    bundle = write_random_bundle(tmp_path / "model")
    write_random_bundle(bundle, seed=1)
    model, description = load_bundle(bundle)
    assert description["labels"][0]["name"] == "Lung tumor"
    assert model.num_classes == 2
