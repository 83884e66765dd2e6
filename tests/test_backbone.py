"""ConTNet backbone: published key layout, parameter counts, stage shapes, golden outputs and one block by hand.

The key lists (every state_dict key of the authors' checkpoints, in order, with shape and
dtype) and the golden file (outputs of the authors' code) are kept in ``tests/data``, so a
clean clone tests on its own.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from contnet_stages import stage_maps

from anomalib_contnet.backbones.contnet import (
    STAGE_NAMES,
    ConTBlock,
    ConTNet,
    PatchwiseTransformerEncoder,
)
from anomalib_contnet.backbones.contnet_configs import (
    CONTNET_CFGS,
    ConTNetConfig,
    list_contnet_variants,
    shortcut_of_state_dict,
)

DATA = Path(__file__).parent / "data"
KEYS = DATA / "contnet_keys"
GOLDEN = DATA / "contnet_tiny_golden.pt"

KEY_FILES = {
    ("contnet_ti", False): "ConT-Ti.tsv",
    ("contnet_s", False): "ConT-S.tsv",
    ("contnet_m", False): "ConT-M.tsv",
    ("contnet_b", False): "ConT-B.tsv",
    ("contnet_b", True): "ConT-B_avgdown.tsv",
}

# Parameter counts of the authors' code with the 1000-class head (the paper's "39.6M" for B is not what it builds).
PUBLISHED_PARAMETERS = {
    "contnet_ti": 5_888_992,
    "contnet_s": 10_103_400,
    "contnet_m": 19_536_936,
    "contnet_b": 36_043_112,
}
CONTNET_B_WITHOUT_FC = 35_018_112

# Stage maps of ConTNet-B at 224x224 as (C, H, W): width doubles and side halves per stage, except in stage 4.
CONTNET_B_AT_224 = {
    "layer0": (64, 56, 56),
    "layer1": (128, 28, 28),
    "layer2": (256, 14, 14),
    "layer3": (512, 7, 7),
    "layer4": (1024, 7, 7),
}


def read_key_file(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """Parse ``key<TAB>(shape)<TAB>dtype`` lines."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape, dtype = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape)), dtype))
    return rows


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute deviation relative to the largest reference magnitude (robust to values near zero)."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.fixture(scope="module")
def contnet_b() -> ConTNet:
    torch.manual_seed(0)
    return timm.create_model("contnet_b").eval()


@pytest.mark.parametrize(("variant", "avg_down"), list(KEY_FILES))
def test_state_dict_matches_published_keys_in_order(variant: str, avg_down: bool) -> None:
    expected = read_key_file(KEYS / KEY_FILES[variant, avg_down])
    actual = [
        (key, tuple(value.shape), str(value.dtype))
        for key, value in timm.create_model(variant, avg_down=avg_down).state_dict().items()
    ]
    assert actual == expected


def test_avg_down_changes_exactly_the_three_strided_shortcuts() -> None:
    plain = [key for key, _, _ in read_key_file(KEYS / "ConT-B.tsv")]
    avg_down = list(timm.create_model("contnet_b", avg_down=True).state_dict())
    changed = [(old, new) for old, new in zip(plain, avg_down, strict=True) if old != new]
    assert changed == [
        (
            f"layer{stage}.ConTBlock{last}.downsample.conv.weight",
            f"layer{stage}.ConTBlock{last}.downsample.conv.conv.weight",
        )
        for stage, last in ((1, 2), (2, 3), (3, 5))
    ]


def test_variant_defaults_are_the_shortcut_of_the_published_download() -> None:
    """contnet_b.pth (the only stable B download) is the avg-down network; the others default to strided."""
    assert {name: config.avg_down for name, config in CONTNET_CFGS.items()} == {
        "contnet_ti": False,
        "contnet_s": False,
        "contnet_m": False,
        "contnet_b": True,
    }
    default_b = [(key, tuple(value.shape)) for key, value in timm.create_model("contnet_b").state_dict().items()]
    assert default_b == [(key, shape) for key, shape, _ in read_key_file(KEYS / "ConT-B_avgdown.tsv")]
    assert timm.create_model("contnet_b", avg_down=False).config.avg_down is False
    assert timm.create_model("contnet_ti", avg_down=True).config.avg_down is True


def meta_state(key_file: str) -> dict[str, torch.Tensor]:
    """A state_dict of the published key list with shape-only tensors (the detection reads keys only)."""
    return {key: torch.empty(shape, device="meta") for key, shape, _ in read_key_file(KEYS / key_file)}


@pytest.mark.parametrize(("key_file", "expected"), [(file, avg_down) for (_, avg_down), file in KEY_FILES.items()])
def test_shortcut_of_the_published_key_lists(key_file: str, expected: bool) -> None:
    assert shortcut_of_state_dict(meta_state(key_file)) is expected


def test_shortcut_of_partial_and_mixed_state_dicts() -> None:
    state = meta_state("ConT-B.tsv")
    assert shortcut_of_state_dict({key: state[key] for key in ("fc.weight", "fc.bias")}) is None
    stage4 = "layer4.ConTBlock2.downsample.conv.weight"  # stride 1: spelled alike in both networks
    assert shortcut_of_state_dict({stage4: state[stage4]}) is None
    mixed = dict(state)
    mixed["layer2.ConTBlock3.downsample.conv.conv.weight"] = mixed.pop("layer2.ConTBlock3.downsample.conv.weight")
    with pytest.raises(ValueError, match=r"mixes both shortcut spellings") as raised:
        shortcut_of_state_dict(mixed)
    assert "layer2.ConTBlock3.downsample.conv.conv.weight" in str(raised.value)
    assert "layer1.ConTBlock2.downsample.conv.weight" in str(raised.value)


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published_code(variant: str) -> None:
    model = timm.create_model(variant)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[variant]


def test_contnet_b_without_head_parameter_count() -> None:
    model = timm.create_model("contnet_b", num_classes=0)
    assert sum(p.numel() for p in model.parameters()) == CONTNET_B_WITHOUT_FC
    assert "fc.weight" not in model.state_dict()


def test_variant_list_is_the_four_published_models() -> None:
    assert list_contnet_variants() == sorted(PUBLISHED_PARAMETERS)


def stage_shapes(model: ConTNet, side: int) -> dict[str, tuple[int, ...]]:
    outputs = stage_maps(model, torch.randn(1, 3, side, side))
    return {name: tuple(value.shape[1:]) for name, value in outputs.items()}


@pytest.mark.parametrize(("side", "scale"), [(224, 1), (448, 2)])
def test_contnet_b_stage_shapes(contnet_b: ConTNet, side: int, scale: int) -> None:
    expected = {name: (c, h * scale, w * scale) for name, (c, h, w) in CONTNET_B_AT_224.items()}
    assert stage_shapes(contnet_b, side) == expected


@pytest.mark.parametrize("variant", ["contnet_ti", "contnet_s", "contnet_m"])
def test_every_variant_stage_shapes_at_224(variant: str) -> None:
    model = timm.create_model(variant).eval()
    width = model.config.inplanes
    # Stage i: width inplanes * 2**i, reductions 4, 8, 16, 32, 32 (the published layout).
    expected = {
        name: (width * 2**index, 224 // stride, 224 // stride)
        for index, (name, stride) in enumerate(zip(STAGE_NAMES, (4, 8, 16, 32, 32), strict=True))
    }
    assert stage_shapes(model, 224) == expected


@pytest.mark.parametrize(("height", "width"), [(31, 64), (64, 31), (16, 16)])
def test_sides_below_32_are_refused(height: int, width: int) -> None:
    model = timm.create_model("contnet_ti")
    with pytest.raises(ValueError, match=r"at least 32 pixels") as raised:
        model(torch.zeros(1, 3, height, width))
    assert f"{height}x{width}" in str(raised.value)


# ---------------------------------------------------------------- any input size: padding to whole patches

# Ti's layout with 8 stem channels: every block kind, cheap enough for 1024x1024 on one core.
TINY_TI = {"inplanes": 8, "mlp_dim": (8, 16, 16, 16), "num_classes": 10}


def expected_stage_shapes(stem_width: int, size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Each stride-2 step (stem conv and max pool, last block of stages 1-3) maps a side n to ceil(n / 2)."""
    sides = list(size)
    shapes = {}
    for index, name in enumerate(STAGE_NAMES):
        for _ in range({0: 2, 4: 0}.get(index, 1)):
            sides = [math.ceil(n / 2) for n in sides]
        shapes[name] = (stem_width * 2**index, *sides)
    return shapes


@pytest.fixture(scope="module")
def tiny_ti() -> ConTNet:
    torch.manual_seed(2)
    return timm.create_model("contnet_ti", **TINY_TI).eval()


@pytest.mark.parametrize("size", [(256, 256), (300, 257), (1024, 1024), (32, 32)])
def test_any_size_gives_the_expected_stage_shapes_deterministically(tiny_ti: ConTNet, size: tuple[int, int]) -> None:
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    first, second = stage_maps(tiny_ti, image), stage_maps(tiny_ti, image)
    alone = stage_maps(tiny_ti, image[1:])
    assert {name: tuple(value.shape[1:]) for name, value in first.items()} == expected_stage_shapes(8, size)
    for name, value in first.items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, second[name]), name
        torch.testing.assert_close(alone[name][0], value[1], rtol=1e-5, atol=1e-5, msg=name)  # masks per image


class PadSpy:
    """Replaces ``torch.nn.functional.pad`` (only the encoders call it): counts calls, optionally fills with noise.

    The noise is large and different on every call, so any path from a padding
    token into a real token's output changes that output.
    """

    def __init__(self, noise: bool) -> None:
        self.original = F.pad
        self.noise = noise
        self.calls = 0
        self.generator = torch.Generator().manual_seed(9)

    def __call__(self, x: torch.Tensor, pad: tuple[int, ...], *args: object, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        padded = self.original(x, pad, *args, **kwargs)
        if not self.noise:
            return padded
        inside = torch.zeros(padded.shape[-2:], dtype=torch.bool)
        inside[: x.shape[-2], : x.shape[-1]] = True
        return torch.where(inside, padded, 100 * torch.randn(padded.shape, generator=self.generator))


@pytest.mark.parametrize("size", [(300, 257), (1024, 1024)])
def test_real_tokens_do_not_see_what_the_padding_holds(
    tiny_ti: ConTNet, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage is bit-identical whether the padding tokens are zeros or large noise: they are masked as keys."""
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(5))
    zero_padded = stage_maps(tiny_ti, image)
    spy = PadSpy(noise=True)
    monkeypatch.setattr(F, "pad", spy)
    noise_padded = stage_maps(tiny_ti, image)
    assert spy.calls > 0
    for name, value in zero_padded.items():
        assert torch.equal(noise_padded[name], value), name


@pytest.mark.parametrize("side", [224, 448])
def test_multiples_of_224_never_pad(tiny_ti: ConTNet, side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The published sizes take the unmasked path: no padding and no mask anywhere (the golden test checks values)."""
    spy = PadSpy(noise=False)
    monkeypatch.setattr(F, "pad", spy)
    stage_maps(tiny_ti, torch.randn(1, 3, side, side))
    assert spy.calls == 0


def test_golden_outputs_of_the_authors_code() -> None:
    golden = torch.load(GOLDEN, weights_only=True)
    model = ConTNet(ConTNetConfig(**golden["config"]))
    model.load_state_dict(golden["state_dict"], strict=True)
    model.eval()
    outputs = stage_maps(model, golden["input"])
    with torch.no_grad():
        outputs["logits"] = model(golden["input"])
    assert sorted(outputs) == sorted(golden["outputs"])
    for name, expected in golden["outputs"].items():
        assert outputs[name].shape == expected.shape, name
        assert relative_error(outputs[name], expected) < 1e-5, name


# ---------------------------------------------------------------- one ConT block, re-derived by hand in float64


def layer_norm(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = tokens.mean(dim=-1, keepdim=True)
    variance = ((tokens - mean) ** 2).mean(dim=-1, keepdim=True)
    return (tokens - mean) / torch.sqrt(variance + 1e-5) * weight + bias


def attention(tokens: torch.Tensor, p: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    channels = tokens.shape[-1]
    qkv = tokens @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
    query, key, value = qkv[:, :channels], qkv[:, channels : 2 * channels], qkv[:, 2 * channels :]
    head_dim = channels // heads
    per_head = []
    for head in range(heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        scores = (query[:, part] @ key[:, part].T) * head_dim**-0.5
        weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        per_head.append(weights @ value[:, part])
    return torch.cat(per_head, dim=-1) @ p["attn.proj.weight"].T + p["attn.proj.bias"]


def mlp(tokens: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = tokens @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return hidden @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]


def encoder_by_hand(x: torch.Tensor, p: dict[str, torch.Tensor], patch: int, heads: int) -> torch.Tensor:
    """Cut into patches pixel by pixel, add the row/column encodings, run the post-norm layer, put pixels back.

    A patch cut by the bottom or right border holds only the pixels that exist:
    its sequence is shorter, each pixel keeping the encoding of its place in the patch.
    """
    batch, channels, height, width = x.shape
    half = channels // 2
    rows_pe, cols_pe = p["pe.0"][0, :, 0, :], p["pe.1"][0, 0, :, :]
    out = torch.empty_like(x)
    for b in range(batch):
        for top in range(0, height, patch):
            for left in range(0, width, patch):
                places = [(r, c) for r in range(min(patch, height - top)) for c in range(min(patch, width - left))]
                tokens = torch.empty(len(places), channels, dtype=x.dtype)
                for index, (r, c) in enumerate(places):
                    pixel = x[b, :, top + r, left + c].clone()
                    pixel[:half] += rows_pe[r]
                    pixel[half:] += cols_pe[c]
                    tokens[index] = pixel
                tokens = layer_norm(tokens + attention(tokens, p, heads), p["norm1.weight"], p["norm1.bias"])
                tokens = layer_norm(tokens + mlp(tokens, p), p["norm2.weight"], p["norm2.bias"])
                for index, (r, c) in enumerate(places):
                    out[b, :, top + r, left + c] = tokens[index]
    return out


def block_by_hand(
    x: torch.Tensor, p: dict[str, torch.Tensor], patches: tuple[int, int], heads: int, kind: str
) -> torch.Tensor:
    """One ConT block in eval mode, as the authors' code computes it: ordinary, strided, avg-down, stage-4 last."""
    scale = 1 / torch.sqrt(p["bn.running_var"] + 1e-5)
    normalised = (x - p["bn.running_mean"][:, None, None]) * scale[:, None, None]
    activated = torch.clamp(normalised * p["bn.weight"][:, None, None] + p["bn.bias"][:, None, None], min=0)
    if kind == "ordinary":
        shortcut = x
    elif kind == "last_strided":
        shortcut = F.conv2d(activated, p["downsample.conv.weight"], stride=2)
    elif kind == "last_avg_down":
        b, c, h, w = activated.shape
        pooled = activated.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))
        shortcut = F.conv2d(pooled, p["downsample.conv.conv.weight"])
    else:  # last block of stage 4: stride 1 projection
        shortcut = F.conv2d(activated, p["downsample.conv.weight"])
    encoded = activated
    for name, patch in zip(("ste1", "ste2"), patches, strict=True):
        prefix = f"{name}."
        encoded = encoder_by_hand(
            encoded, {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}, patch, heads
        )
    weight = p["out_conv.conv.weight"]
    if kind == "ordinary":
        convolved = F.conv2d(encoded, weight, stride=1, padding=1)
    elif kind in {"last_strided", "last_avg_down"}:
        convolved = F.conv2d(encoded, weight, stride=2, padding=1)
    else:
        convolved = F.conv2d(encoded, weight)
    return convolved + shortcut


BLOCK_KINDS = {
    "ordinary": {"expand": False, "stride": 1, "avg_down": False},
    "last_strided": {"expand": True, "stride": 2, "avg_down": False},
    "last_avg_down": {"expand": True, "stride": 2, "avg_down": True},
    "last_stage4": {"expand": True, "stride": 1, "avg_down": False},
}


@pytest.mark.parametrize("kind", list(BLOCK_KINDS))
def test_one_block_matches_float64_derivation(kind: str) -> None:
    planes, heads, patches = 4, 2, (2, 4)
    block = ConTBlock(planes, mlp_dim=6, num_heads=heads, patch_sizes=patches, **BLOCK_KINDS[kind]).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
        x = torch.randn(2, planes, 8, 8, generator=generator)
        actual = block(x)
    params = {name: tensor.double() for name, tensor in block.state_dict().items() if tensor.is_floating_point()}
    expected = block_by_hand(x.double(), params, patches, heads, kind)
    assert actual.shape == expected.shape
    assert actual.shape[1] == (2 * planes if BLOCK_KINDS[kind]["expand"] else planes)
    assert relative_error(actual, expected) < 1e-5


def random_encoder(patch: int) -> PatchwiseTransformerEncoder:
    encoder = PatchwiseTransformerEncoder(dim=4, patch_size=patch, num_heads=2, mlp_dim=6, dropout=0.0).eval()
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return encoder


@pytest.mark.parametrize(("height", "width"), [(10, 13), (4, 7), (3, 3)])
def test_border_patches_are_encoded_from_their_real_tokens_alone(height: int, width: int) -> None:
    """A cut patch equals a transformer over just its pixels (float64 by hand), whatever padding made it whole."""
    patch = 4
    encoder = random_encoder(patch)
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        actual = encoder(x)
    params = {name: tensor.double() for name, tensor in encoder.state_dict().items()}
    expected = encoder_by_hand(x.double(), params, patch, heads=2)
    assert actual.shape == x.shape
    assert relative_error(actual, expected) < 1e-5


def test_whole_patches_of_a_padded_map_equal_the_patch_aligned_crop() -> None:
    """Cropping a 10x13 map to its whole 4x4 patches (8x12, no padding) leaves those patches' encoding unchanged.

    The border patches are the only difference between the two runs, so this
    fails if padding reaches a patch it does not belong to (wrong fold order,
    a mask of another patch) or if the padded path computes whole patches differently.
    """
    encoder = random_encoder(4)
    x = torch.randn(2, 4, 10, 13, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        padded, cropped = encoder(x), encoder(x[..., :8, :12])
        border_changed = encoder(torch.cat((x[..., :9, :], torch.zeros_like(x[..., 9:, :])), dim=-2))
    torch.testing.assert_close(padded[..., :8, :12], cropped, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(border_changed[..., 8:, :], padded[..., 8:, :])  # the comparison can tell patches apart
    torch.testing.assert_close(border_changed[..., :8, :], padded[..., :8, :], rtol=1e-6, atol=1e-6)
