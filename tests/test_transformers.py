"""Transformers: FFN neurons and attention heads as units, loose per-channel parameters,
and small Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from helpers import make_model, zero_consumers
from mipp import prune
from mipp.inputs import Samples
from mipp.surgery.structure import UnsupportedModuleError, build_structure


def test_attention_heads_are_units_when_the_module_declares_its_head_size():
    model, x = make_model("transformer-heads", n=512)
    structure = build_structure(copy.deepcopy(model), x[:2])
    g = structure.group("blocks.0.attn.q")
    assert (g.kind, g.size, g.ties, g.attention) == ("heads", 4, 4, "blocks.0.attn")
    assert g.producers == ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"]
    assert g.producer_index["blocks.0.attn.v"][2] == (8, 9, 10, 11)  # head 2: channels 8-11
    assert [c.layer for c in g.consumers] == ["blocks.0.attn.o"]
    assert g in structure.in_scope("internal")
    pruned = copy.deepcopy(model)
    removed = {"blocks.0.attn.q": [0, 2], "blocks.1.attn.q": [3]}
    build_structure(pruned, x[:2]).remove(removed)
    attn = pruned.blocks[0].attn
    assert (attn.q.out_features, attn.v.out_features, attn.o.in_features) == (8, 8, 8)
    assert attn.num_heads == 2 and pruned.blocks[1].attn.num_heads == 3
    masked = copy.deepcopy(model)
    zero_consumers(masked, build_structure(masked, x[:2]), removed)
    with torch.no_grad():
        diff = (pruned.double()(x[:8].double()) - masked.double()(x[:8].double())).abs().max()
    assert diff.item() < 1e-9


def test_heads_pruned_by_mipp_at_high_sparsity_are_whole_heads():
    model, x = make_model("transformer-heads", n=512)
    result = prune(model, x, sparsity=0.9, compensate=False)
    widths = {g.name: (g.kind, g.width_after) for g in result.report.groups}
    for i, block in enumerate(result.model.blocks):
        kind, heads = widths[f"blocks.{i}.attn.q"]
        assert kind == "heads" and 1 <= heads <= 4
        assert block.attn.q.out_features == block.attn.o.in_features == 4 * heads
        assert block.attn.num_heads == heads
    assert sum(4 - w for k, w in widths.values() if k == "heads") >= 1  # some head went


class FusedAttention(nn.Module):
    """timm-style attention: one fused ``qkv`` projection (q, k and v side by side) whose
    reshape reads ``num_heads`` / ``head_dim`` / ``attn_dim``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        self.attn_dim = heads * self.head_dim
        self.qkv = nn.Linear(width, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(n, t, self.attn_dim))


class PreNormNet(nn.Module):
    """Tokens → two pre-norm blocks (x + attn(LN(x)), x + MLP(LN(x))) → mean → classifier."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.norm1, block.attn = nn.LayerNorm(width), FusedAttention(width, heads)
            block.norm2, block.fc1 = nn.LayerNorm(width), nn.Linear(width, 2 * width)
            block.fc2 = nn.Linear(2 * width, width)
            self.blocks.append(block)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = h + b.attn(b.norm1(h))
            h = h + b.fc2(torch.relu(b.fc1(b.norm2(h))))
        return self.head(h.mean(1))


def test_fused_qkv_heads_and_pre_norm_targets():
    """A fused qkv projection is one producer whose units are heads (each the same
    head-size slice of the q, k and v thirds); a removal shrinks qkv, proj and the module's
    head attributes, exact against the masked original. In a pre-norm stack a layer's
    targets are the next layer reading the stream through its LayerNorm, not every later
    block."""
    torch.manual_seed(0)
    model = PreNormNet().eval()
    x = torch.randn(256, 6, 5)
    structure = build_structure(copy.deepcopy(model), x[:2])
    g = structure.group("blocks.0.attn.qkv")
    assert (g.kind, g.size, g.ties, g.attention) == ("heads", 4, 12, "blocks.0.attn")
    assert g.producer_index["blocks.0.attn.qkv"][1] == (4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39)
    assert [c.layer for c in g.consumers] == ["blocks.0.attn.proj"]
    assert g.consumers[0].index[1] == (4, 5, 6, 7)  # the v third, as proj reads it
    assert structure.next_layers["blocks.0.fc2"] == ["blocks.1.attn.qkv"]
    assert structure.next_layers["blocks.0.attn.proj"] == ["blocks.0.fc1"]
    assert structure.next_layers["blocks.1.fc2"] == ["head"]
    pruned = copy.deepcopy(model)
    removed = {"blocks.0.attn.qkv": [0, 2], "blocks.1.attn.qkv": [3]}
    build_structure(pruned, x[:2]).remove(removed)
    attn = pruned.blocks[0].attn
    assert (attn.qkv.out_features, attn.proj.in_features) == (24, 8)
    assert (attn.num_heads, attn.attn_dim, attn.head_dim) == (2, 8, 4)
    assert pruned.blocks[1].attn.num_heads == 3
    masked = copy.deepcopy(model)
    zero_consumers(masked, build_structure(masked, x[:2]), removed)
    with torch.no_grad():
        diff = (pruned.double()(x[:8].double()) - masked.double()(x[:8].double())).abs().max()
    assert diff.item() < 1e-9
    result = prune(model, x, sparsity=0.7, compensate=False)  # verified inside
    heads = {g.name: g.width_after for g in result.report.groups if g.kind == "heads"}
    assert set(heads) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    for i, block in enumerate(result.model.blocks):
        assert block.attn.num_heads == heads[f"blocks.{i}.attn.qkv"]
        assert block.attn.qkv.out_features == 3 * block.attn.proj.in_features


class TinyViT(nn.Module):
    """Patches → tokens with a cls_token and a learned pos_embed, a block with a layer-scale
    gamma: per-channel parameters held by the root module and a block."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16) * 0.1)
        self.block = make_model("transformer-heads")[0].blocks[0]
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        t = t + self.gamma * self.block(t)
        return self.head(self.ln(t)[:, 0])


def test_loose_per_channel_parameters_are_sliced_with_the_stream():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(512, 3, 8, 8)
    result = prune(model, x, sparsity=0.5, scope="all", compensate=False)  # verified
    stream = result.model.patch.out_channels
    assert stream < 16  # the residual stream was pruned, its parameters with it
    assert result.model.cls_token.shape == (1, 1, stream)
    assert result.model.pos_embed.shape == (1, 5, stream)
    assert result.model.gamma.shape == (stream,)
    assert result.model.ln.normalized_shape == (stream,)


def _transformers():
    """Import transformers; torchvision, when installed as a CUDA build against a CPU torch,
    breaks its import unless two op schemas exist first (the workaround for that build)."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install 'mipp[bench]')")
    if importlib.util.find_spec("torchvision") is not None and "torchvision" not in sys.modules:
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _transformers.lib = lib  # keep the definitions alive
        except RuntimeError:  # already defined: torchvision's own ops load
            pass
    import transformers

    return transformers


def test_hugging_face_bert_prunes_ffn_neurons_and_heads():
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (400, 16))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = prune(model, data, sparsity=0.8, compensate=False)  # verified inside
    groups = {g.name: g for g in result.report.groups}
    layer = "bert.encoder.layer.{}.".format
    assert groups[layer(0) + "attention.self.query"].kind == "heads"
    assert groups[layer(0) + "intermediate.dense"].kind == "internal"
    for i, block in enumerate(result.model.bert.encoder.layer):
        heads = groups[layer(i) + "attention.self.query"].width_after
        assert block.attention.self.query.out_features == 8 * heads
        assert block.attention.self.num_attention_heads == heads
        assert block.attention.output.dense.out_features == 32  # residual width kept
        assert block.intermediate.dense.out_features < 64
    out = result.model(**{k: v[:4] for k, v in data.items()}).logits
    assert out.shape == (4, 3) and torch.isfinite(out).all()


def test_hugging_face_gpt2_conv1d_prunes_ffn_neurons_and_heads_and_stays_conv1d():
    """GPT-2's Conv1D (a Linear with its weight transposed) is pruned as a Linear and given
    back as Conv1D; its fused c_attn holds whole heads (``split_size`` follows them); the
    user's model is untouched; removing heads by hand equals the masked original."""
    transformers = _transformers()
    from transformers.pytorch_utils import Conv1D

    from mipp.surgery.layers import as_linears, restore_transposed

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, use_cache=False
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (300, 12))
    data = {"input_ids": ids}
    result = prune(model, data, sparsity=0.8, compensate=False)  # verified inside
    groups = {g.name: g for g in result.report.groups}
    assert groups["transformer.h.0.attn.c_attn"].kind == "heads"
    assert groups["transformer.h.0.mlp.c_fc"].kind == "internal"
    for i, block in enumerate(result.model.transformer.h):
        heads = groups[f"transformer.h.{i}.attn.c_attn"].width_after
        assert isinstance(block.attn.c_attn, Conv1D) and isinstance(block.mlp.c_fc, Conv1D)
        assert block.attn.c_attn.weight.shape == (32, 3 * 8 * heads)  # (in, out): Conv1D's
        assert block.attn.num_heads == heads and block.attn.split_size == 8 * heads
        assert block.mlp.c_fc.nf == groups[f"transformer.h.{i}.mlp.c_fc"].width_after < 128
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)  # the input model unchanged
    assert model.transformer.h[0].mlp.c_fc.nf == 128
    with pytest.raises(UnsupportedModuleError, match="as_linears"):  # unconverted: refused
        build_structure(model, Samples(ids[:2]))
    out = result.model(input_ids=ids[:4]).logits
    assert out.shape == (4, 12, 100) and torch.isfinite(out).all()
    # heads removed by hand through the structure: equal to zeroing them
    pruned, masked = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    removed = {"transformer.h.0.attn.c_attn": [1, 3], "transformer.h.1.attn.c_attn": [0]}
    for net in (pruned, masked):
        swapped = as_linears(net)
        structure = build_structure(net, Samples(data["input_ids"][:2]))
        if net is pruned:
            structure.remove(removed)
        else:
            zero_consumers(net, structure, removed)
        restore_transposed(net, swapped)
    assert (
        pruned.transformer.h[0].attn.c_attn.nf == 48 and pruned.transformer.h[0].attn.num_heads == 2
    )
    with torch.no_grad():
        a, b = pruned(input_ids=ids[:6]).logits, masked(input_ids=ids[:6]).logits
    assert (a - b).abs().max().item() < 1e-9


def test_hugging_face_vit_keeps_its_embeddings_and_prunes_inside_blocks():
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(400, 3, 16, 16)
    result = prune(model, x, sparsity=0.5, compensate=False)  # verified inside
    kinds = {g.kind for g in result.report.groups}
    assert kinds <= {"internal", "heads"} and "heads" in kinds
    assert result.model.vit.embeddings.cls_token.shape[-1] == 32
    assert result.report.achieved["units"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("name", "scope"),
    [
        ("vit", "internal"),
        pytest.param("vit", "all", marks=pytest.mark.slow),
        pytest.param("convnext", "internal", marks=pytest.mark.slow),
        pytest.param("convnext", "all", marks=pytest.mark.slow),
    ],
)
def test_zoo_vit_and_convnext_prune_to_target(name, scope):
    from mipp.zoo.models import create

    torch.manual_seed(0)
    model = create(name, input_size=16 if name == "convnext" else 32).eval()
    side = 16 if name == "convnext" else 32
    x = torch.randn(256, 3, side, side)
    result = prune(model, x, sparsity=0.5, scope=scope, compensate=False)  # verified inside
    report = result.report
    assert abs(report.achieved["units"] - 0.5) <= 0.01
    kinds = {g.kind for g in report.groups}
    assert kinds == ({"internal", "heads"} if name == "vit" else {"internal"}) | (
        {"stream"} if scope == "all" else set()
    )
    if name == "vit" and scope == "all":
        width = result.model.patch_embed.out_channels
        assert result.model.cls_token.shape[-1] == result.model.pos_embed.shape[-1] == width
