"""Tests for mipp.zoo.models: shapes, parameter counts, registry, widths, prunability."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch_pruning as tp
from torch import nn

from mipp.errors import UnknownNameError
from mipp.metrics import layer_widths
from mipp.zoo.models import (
    MODELS,
    CifarResNet,
    LeNet5,
    create,
    describe,
    list_models,
    output_layer,
)
from mipp.zoo.models.vgg import VGG_STAGES, vgg_default_widths

ALL_MODELS = [
    "mlp",
    "lenet5",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenetv2",
    "convnext",
    "vit",
    "googlenet",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_create(name: str, **options: object) -> nn.Module:
    """Build on the meta device: real shapes and parameter counts, no memory or compute."""
    with torch.device("meta"):
        return create(name, **options)


# --- independent parameter formulas (written from the papers' layer tables) -----------------


def conv_bn(cin: int, cout: int, k: int) -> int:
    """Bias-free k×k conv followed by BatchNorm (weight + bias)."""
    return k * k * cin * cout + 2 * cout


def linear(fin: int, fout: int) -> int:
    return fin * fout + fout


def formula_mlp(fin: int, widths: tuple[int, ...], nc: int) -> int:
    sizes = (fin, *widths, nc)
    return sum(linear(a, b) for a, b in itertools.pairwise(sizes))


def formula_lenet(cin: int, nc: int) -> int:
    conv1 = 5 * 5 * cin * 6 + 6
    conv2 = 5 * 5 * 6 * 16 + 16
    return conv1 + conv2 + linear(16 * 5 * 5, 120) + linear(120, 84) + linear(84, nc)


def formula_vgg(depth: int, cin: int, nc: int) -> int:
    total, prev = 0, cin
    for n, w in zip(VGG_STAGES[depth], (64, 128, 256, 512, 512), strict=True):
        for _ in range(n):
            total += conv_bn(prev, w, 3)
            prev = w
    return total + linear(512, nc)


def basic_block(cin: int, cout: int) -> int:
    projection = conv_bn(cin, cout, 1) if cin != cout else 0  # every shape change here
    return conv_bn(cin, cout, 3) + conv_bn(cout, cout, 3) + projection


def formula_cifar_resnet(depth: int, cin: int, nc: int) -> int:
    n = (depth - 2) // 6
    total = conv_bn(cin, 16, 3)
    prev = 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += basic_block(prev, w)
            prev = w
    return total + linear(64, nc)


def bottleneck(cin: int, planes: int, stride: int) -> int:
    out = 4 * planes
    projection = conv_bn(cin, out, 1) if (stride != 1 or cin != out) else 0
    return (
        conv_bn(cin, planes, 1)
        + conv_bn(planes, planes, 3)
        + conv_bn(planes, out, 1)
        + (projection)
    )


def formula_resnet(depth: int, cin: int, nc: int) -> int:
    counts = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    total, prev = conv_bn(cin, 64, 3), 64
    for planes, n, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2), strict=True):
        for i in range(n):
            s = stride if i == 0 else 1
            if depth == 50:
                total += bottleneck(prev, planes, s)
                prev = 4 * planes
            else:
                total += basic_block(prev, planes)
                prev = planes
    return total + linear(prev, nc)


def formula_mobilenetv2(cin: int, nc: int) -> int:
    """Sandler et al. 2018, Table 2, with every conv bias-free and batch-normalised."""
    stages = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    total, prev = conv_bn(cin, 32, 3), 32
    for t, c, n in stages:
        for _ in range(n):
            hidden = prev * t
            expand = conv_bn(prev, hidden, 1) if t != 1 else 0
            depthwise = 3 * 3 * hidden + 2 * hidden  # one 3×3 filter per channel + BN
            total += expand + depthwise + conv_bn(hidden, c, 1)
            prev = c
    return total + conv_bn(320, 1280, 1) + linear(1280, nc)


def formula_convnext(cin: int, nc: int) -> int:
    """Liu et al. 2022's block (depthwise 7×7 with bias, LayerNorm, 4× MLP, layer scale) at
    widths 32-256, depths 2-2-4-2, 2×2 stride-2 stem and downsampling convs."""
    widths, depths = (32, 64, 128, 256), (2, 2, 4, 2)
    total = cin * widths[0] * 4 + widths[0] + 2 * widths[0]  # stem conv + its LayerNorm
    for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
        if i:
            prev = widths[i - 1]
            total += 2 * prev + prev * w * 4 + w  # LayerNorm + 2×2 conv
        block = (49 * w + w) + 2 * w + linear(w, 4 * w) + linear(4 * w, w) + w
        total += d * block
    return total + 2 * widths[-1] + linear(widths[-1], nc)


def formula_vit(cin: int, nc: int) -> int:
    """4×4 patches of 32 px (64 tokens + cls), width 96, 4 blocks, MLP ratio 4."""
    w, tokens = 96, 64
    total = cin * w * 16 + w + w + (tokens + 1) * w  # patch conv, cls_token, pos_embed
    block = 2 * w + 4 * linear(w, w) + 2 * w + linear(w, 4 * w) + linear(4 * w, w)
    return total + 4 * block + 2 * w + linear(w, nc)


def formula_googlenet(cin: int, nc: int) -> int:
    """Szegedy et al. 2015, Table 1 (Inception widths), every conv bias-free with BatchNorm,
    a 3×3 stem to 192 channels."""
    modules = [
        (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), (192, 96, 208, 16, 48, 64),
        (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
        (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128),
        (384, 192, 384, 48, 128, 128),
    ]  # fmt: skip
    total, prev = conv_bn(cin, 192, 3), 192
    for n1, r3, n3, r5, n5, pp in modules:
        total += conv_bn(prev, n1, 1) + conv_bn(prev, r3, 1) + conv_bn(r3, n3, 3)
        total += conv_bn(prev, r5, 1) + conv_bn(r5, n5, 5) + conv_bn(prev, pp, 1)
        prev = n1 + n3 + n5 + pp
    return total + linear(prev, nc)


def formula(name: str, cin: int, nc: int, size: int = 32) -> int:
    if name == "googlenet":
        return formula_googlenet(cin, nc)
    if name == "convnext":
        return formula_convnext(cin, nc)
    if name == "vit":
        return formula_vit(cin, nc)
    if name == "mobilenetv2":
        return formula_mobilenetv2(cin, nc)
    if name == "mlp":
        return formula_mlp(cin * size * size, (300, 100), nc)
    if name == "lenet5":
        return formula_lenet(cin, nc)
    depth = int(name.removeprefix("vgg").removeprefix("resnet"))
    if name.startswith("vgg"):
        return formula_vgg(depth, cin, nc)
    if depth in (20, 32, 56):
        return formula_cifar_resnet(depth, cin, nc)
    return formula_resnet(depth, cin, nc)


# Exact counts at 3 channels, 32 px, 10 classes (the formulas above reproduce them).
EXACT_PARAMS = {
    "mlp": 953_010,
    "lenet5": 62_006,
    "vgg11": 9_228_362,
    "vgg13": 9_413_066,
    "vgg16": 14_724_042,
    "vgg19": 20_035_018,
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet56": 855_770,
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "mobilenetv2": 2_236_682,
    "convnext": 1_901_802,
    "vit": 459_562,
    "googlenet": 5_871_914,
}


# --- registry ------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert sorted(ALL_MODELS) == list_models() == sorted(MODELS)
    for name in ALL_MODELS:
        assert isinstance(describe(name), str) and "\n" not in describe(name)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create("resnet21")
    message = str(info.value)
    assert "resnet21" in message
    assert all(name in message for name in ALL_MODELS)
    with pytest.raises(UnknownNameError):
        describe("alexnet")


# --- shapes --------------------------------------------------------------------------------


#: the deep ResNets take seconds each: their shapes are checked in the slow tier
_DEEP = ("resnet32", "resnet34", "resnet50", "resnet56", "mobilenetv2", "convnext", "googlenet")


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _DEEP else n for n in ALL_MODELS],
)
def test_output_shapes(name: str) -> None:
    """(2, c, s, s) → (2, num_classes) for 1/3 channels, 28/32 px, 10/100 classes.

    The grid runs on the meta device (shape propagation only, no arithmetic); one real
    forward per model below checks the numbers.
    """
    for cin in (1, 3):
        for size in (28, 32):
            for nc in (10, 100):
                model = meta_create(name, num_classes=nc, in_channels=cin, input_size=size)
                with torch.device("meta"):
                    y = model(torch.empty(2, cin, size, size))
                assert y.shape == (2, nc), (name, cin, size, nc)
                assert output_layer(model).out_features == nc


@pytest.mark.parametrize("name", ALL_MODELS)
def test_real_forward_is_finite(name: str) -> None:
    model = create(name, num_classes=100, in_channels=1, input_size=28).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 100)
    assert torch.isfinite(y).all()
    assert y.std() > 0  # the logits depend on the weights and input, not a constant


def test_lenet_28_and_32_px_reach_400_features() -> None:
    m28, m32 = LeNet5(input_size=28), LeNet5(input_size=32)
    assert m28.conv1.padding == (2, 2) and m32.conv1.padding == (0, 0)
    assert m28.fc1.in_features == m32.fc1.in_features == 16 * 5 * 5
    assert LeNet5(input_size=36).fc1.in_features == 16 * 6 * 6  # general flatten size
    with pytest.raises(ValueError, match="11"):
        LeNet5(input_size=11)
    assert LeNet5(input_size=12)(torch.zeros(1, 1, 12, 12)).shape == (1, 10)


@pytest.mark.parametrize("size", [28, 32])
def test_vgg_feature_map_is_1x1_at_28_and_32_px(size: int) -> None:
    """ceil_mode pooling: 28 → 14 → 7 → 4 → 2 → 1 and 32 → 16 → 8 → 4 → 2 → 1."""
    model = create("vgg11", input_size=size, widths=(4,) * 8).eval()
    sides = []
    x = torch.zeros(1, 3, size, size)
    for child in model.features:
        x = child(x)
        if isinstance(child, nn.MaxPool2d):
            sides.append(x.shape[-1])
    expected = [14, 7, 4, 2, 1] if size == 28 else [16, 8, 4, 2, 1]
    assert sides == expected


# --- parameter counts ----------------------------------------------------------------------


def test_lenet5_classic_parameter_count() -> None:
    model = create("lenet5", in_channels=1, input_size=32)
    assert n_params(model) == 61_706 == formula_lenet(1, 10)
    assert n_params(create("lenet5", in_channels=1, input_size=28)) == 61_706


def test_mlp_is_lenet_300_100_on_mnist() -> None:
    assert n_params(create("mlp", in_channels=1, input_size=28)) == 266_610


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_count_matches_independent_formula(name: str) -> None:
    assert n_params(meta_create(name)) == EXACT_PARAMS[name] == formula(name, 3, 10)
    assert n_params(meta_create(name, num_classes=100, in_channels=1)) == formula(name, 1, 100)


@pytest.mark.parametrize(
    ("name", "published", "rel_tol"),
    [
        # He et al. 2016, Table 6 (option A; our option-B projections add 2,752 parameters).
        ("resnet20", 0.27e6, 0.02),
        ("resnet56", 0.85e6, 0.02),
        # Common CIFAR-10 adaptations (kuangliu/pytorch-cifar and pruning papers).
        ("resnet18", 11.17e6, 0.01),
        ("resnet34", 21.28e6, 0.01),
        ("resnet50", 23.52e6, 0.01),
        # VGG-16-BN CIFAR-10, ≈14.73 M with conv biases; ours are bias-free (−4,224).
        ("vgg16", 14.73e6, 0.01),
    ],
)
def test_parameter_count_near_published_figure(name: str, published: float, rel_tol: float) -> None:
    assert n_params(meta_create(name)) == pytest.approx(published, rel=rel_tol)


def test_vgg16_conv_biases_explain_gap_to_published_count() -> None:
    conv_biases = sum(vgg_default_widths(16))
    assert conv_biases == 4_224
    assert EXACT_PARAMS["vgg16"] + conv_biases == 14_728_266


# --- widths and validation -----------------------------------------------------------------


def test_requested_widths_are_built() -> None:
    assert layer_widths(create("mlp", widths=(64, 32))) == {"fc1": 64, "fc2": 32, "fc3": 10}
    assert layer_widths(create("lenet5", widths=(4, 8, 32, 16), num_classes=3)) == {
        "conv1": 4,
        "conv2": 8,
        "fc1": 32,
        "fc2": 16,
        "fc3": 3,
    }
    widths = (4, 8, 12, 16, 20, 24, 28, 32)
    vgg = create("vgg11", widths=widths)
    got = layer_widths(vgg)
    assert list(got.values()) == [*widths, 10]
    assert list(got) == [f"features.conv{i}" for i in range(1, 9)] + ["fc"]
    assert vgg.fc.in_features == 32
    assert vgg(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_default_vgg_widths() -> None:
    assert vgg_default_widths(16) == (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    assert [len(vgg_default_widths(d)) for d in (11, 13, 16, 19)] == [8, 10, 13, 16]


def test_invalid_options_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="widths"):
        create("resnet20", widths=(8, 8))
    with pytest.raises(ValueError, match="13 entries"):
        create("vgg16", widths=(8,) * 12)
    with pytest.raises(ValueError, match="-3"):
        create("mlp", widths=(10, -3))
    with pytest.raises(ValueError, match=r"num_classes.*got 0"):
        create("resnet18", num_classes=0)
    with pytest.raises(ValueError, match=r"in_channels.*got 0"):
        create("vgg11", in_channels=0)
    with pytest.raises(ValueError, match=r"input_size.*got 4"):
        create("resnet20", input_size=4)
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21)


def test_construction_is_deterministic_under_manual_seed() -> None:
    torch.manual_seed(0)
    a = create("resnet20")
    torch.manual_seed(0)
    b = create("resnet20")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_init_conventions() -> None:
    model = create("resnet20")
    assert torch.equal(model.bn1.weight, torch.ones(16))
    assert torch.equal(model.bn1.bias, torch.zeros(16))
    # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k)).
    w = create("resnet18").layer4[1].conv2.weight  # 512 × 512 × 3 × 3: plenty of samples
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)


def test_blocks_have_uniform_child_names() -> None:
    model = create("resnet20")
    for block in (*model.layer1, *model.layer2, *model.layer3):
        names = [n for n, _ in block.named_children()]
        assert names == ["conv1", "bn1", "relu1", "conv2", "bn2", "shortcut", "relu_out"]
    assert len(model.layer1[0].shortcut) == 0
    assert [n for n, _ in model.layer2[0].shortcut.named_children()] == ["conv", "bn"]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) == 1 + 9 * 2


# --- Torch-Pruning dependency graph ----------------------------------------------------------

# Groups found by DG.get_all_groups with the classifier ignored, Conv2d/Linear roots:
# - mlp: each hidden Linear (2); lenet5: conv1, conv2, fc1, fc2 (4); vggD: one per conv.
# - CIFAR ResNet-(6n+2): one block-internal group per block (conv1 → bn1 → conv2 input,
#   3n) + one per residual stream (3: stage 1's stream includes the stem conv because
#   layer1.0 has an identity shortcut; stages 2 and 3 start with a projection).
# - ResNet-18/34: one per block + 4 streams (stem joins layer1's stream): 8 + 4, 16 + 4.
# - ResNet-50: two per bottleneck (conv1, conv2) = 32, 4 streams, and the stem conv on its
#   own (layer1.0 projects 64 → 256, so the stem is not tied to a residual add): 37.
EXPECTED_GROUPS = {
    "mlp": 2,
    "lenet5": 4,
    "vgg11": 8,
    "vgg13": 10,
    "vgg16": 13,
    "vgg19": 16,
    "resnet20": 3 * 3 + 3,
    "resnet32": 3 * 5 + 3,
    "resnet56": 3 * 9 + 3,
    "resnet18": 8 + 4,
    "resnet34": 16 + 4,
    "resnet50": 2 * 16 + 4 + 1,
    # MobileNetV2: each expand conv with its depthwise conv (16), the stem with the first
    # block's depthwise conv, one stream per stage (7) and the last 1×1 conv.
    "mobilenetv2": 16 + 1 + 7 + 1,
    # ConvNeXt: each block's MLP hidden layer (2 + 2 + 4 + 2) and one stream per stage.
    "convnext": 10 + 4,
    # ViT: each block's MLP hidden layer and q/k/v (tied by attention), and the stream.
    "vit": 4 + 4 + 1,
    # GoogLeNet: every conv is its own group (concatenations join no channels): the stem and
    # six per Inception module.
    "googlenet": 1 + 9 * 6,
}


def build_graph(model: nn.Module) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_dependency_graph_groups(name: str) -> None:
    model = create(name)
    graph = build_graph(model)
    groups = list(
        graph.get_all_groups(
            ignored_layers=[output_layer(model)], root_module_types=[nn.Conv2d, nn.Linear]
        )
    )
    assert len(groups) == EXPECTED_GROUPS[name]


def _targets(group: tp.Group, handler: object) -> set[nn.Module]:
    return {dep.target.module for dep, _ in group if dep.handler == handler}


def test_resnet20_group_structure_and_pruning() -> None:
    model = create("resnet20")
    graph = build_graph(model)
    # Block-internal group: conv1's filters, bn1's channels and conv2's input channels only.
    block = model.layer2[1]
    group = graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=[0, 5])
    modules = {dep.target.module for dep, _ in group} & set(model.modules())
    assert modules == {block.conv1, block.bn1, block.conv2}
    # Stage-1 residual stream: stem + every layer1 block's conv2 share channel indices.
    stream = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0])
    assert _targets(stream, tp.prune_conv_out_channels) == {
        model.conv1,
        *(b.conv2 for b in model.layer1),
    }
    assert _targets(stream, tp.prune_conv_in_channels) == {
        *(b.conv1 for b in model.layer1),
        model.layer2[0].conv1,
        model.layer2[0].shortcut.conv,
    }
    # Removing two filters keeps the model runnable and changes exactly those widths.
    group.prune()
    assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == 30
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
