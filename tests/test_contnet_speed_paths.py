"""ConTNet's CPU inference paths (oneDNN linear layers with GELU fused, channels-last maps) against the plain ones.

For float32 CPU inference in eager mode, :mod:`~anomalib_contnet.backbones.cpu_inference`
calls oneDNN directly and the stem makes the image channels-last, a layout every later map
keeps; everywhere else the network runs as written. These tests check that both give the
same outputs, that each excluded case really takes ``F.linear``, and that an exported graph
is the same with the paths on and off, holds only standard operators and matches eager inference.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from contnet_stages import stage_maps
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anomalib_contnet.backbones.contnet import ConTNet, FeedForward
from anomalib_contnet.backbones.cpu_inference import applies, linear, prepare_input

ONEDNN_LINEAR = "mkldnn::_linear_pointwise"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute deviation relative to the largest reference magnitude."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def profiled_operators(function: Callable[..., object], *args: object, **kwargs: object) -> set[str]:
    """Names of the operators ``function(*args, **kwargs)`` ran, as torch's profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        function(*args, **kwargs)
    return {event.key for event in profile.key_averages()}


@pytest.fixture(scope="module", params=["contnet_ti", "contnet_b"])
def network(request: pytest.FixtureRequest) -> ConTNet:
    torch.manual_seed(11)
    return timm.create_model(request.param, num_classes=0).eval()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("size", [(224, 224), (300, 257)])
def test_onednn_path_equals_the_plain_operators(network: ConTNet, size: tuple[int, int]) -> None:
    """Every stage within 1e-5 relative of the same network on ``F.linear`` (oneDNN switched off)."""
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(12))
    fast = stage_maps(network, image)
    with torch.backends.mkldnn.flags(enabled=False):
        plain = stage_maps(network, image)
    for name, expected in plain.items():
        assert fast[name].shape == expected.shape, name
        assert relative_error(fast[name], expected) < 1e-5, name
        assert fast[name].is_contiguous(memory_format=torch.channels_last), name
    assert ONEDNN_LINEAR in profiled_operators(stage_maps, network, image)
    with torch.backends.mkldnn.flags(enabled=False):
        assert ONEDNN_LINEAR not in profiled_operators(stage_maps, network, image)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_equals_the_layer_with_exact_gelu(gelu: bool) -> None:
    layer = nn.Linear(48, 80)
    tokens = torch.randn(3, 49, 48, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected = layer(tokens)
        expected = torch.nn.functional.gelu(expected) if gelu else expected
        assert ONEDNN_LINEAR in profiled_operators(linear, tokens, layer, gelu=gelu)
        actual = linear(tokens, layer, gelu=gelu)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_every_excluded_case_takes_f_linear() -> None:
    """Autograd, autocast, dispatch modes, tracing, other dtypes and a switched-off oneDNN keep the usual operator."""
    layer = nn.Linear(8, 8)
    tokens = torch.randn(4, 8)

    def runs_onednn(tokens: torch.Tensor, layer: nn.Linear) -> bool:
        return ONEDNN_LINEAR in profiled_operators(linear, tokens, layer)

    with torch.no_grad():
        assert runs_onednn(tokens, layer) == torch.backends.mkldnn.is_available()
        with torch.backends.mkldnn.flags(enabled=False):
            assert not applies(tokens)
            assert not runs_onednn(tokens, layer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not applies(tokens)
            assert not runs_onednn(tokens, layer)
        with FlopCounterMode(display=False):
            assert not applies(tokens)
            assert not runs_onednn(tokens, layer)
        assert not runs_onednn(tokens.double(), nn.Linear(8, 8).double())
    assert not runs_onednn(tokens, layer)  # gradients on: the weight requires them
    with torch.no_grad():
        traced = torch.jit.trace(FeedForward(8, 16, dropout=0.0).eval(), (tokens,))  # as ONNX's TorchScript exporter
    graph = str(traced.inlined_graph)
    assert "mkldnn" not in graph
    assert "aten::linear" in graph
    assert "aten::gelu" in graph


def test_maps_keep_the_plain_layout_where_the_paths_do_not_apply() -> None:
    """``prepare_input`` makes the image channels-last where the paths apply; elsewhere every map stays contiguous."""
    image = torch.randn(1, 3, 64, 64)
    assert prepare_input(image).is_contiguous(memory_format=torch.channels_last) == applies(image)
    with torch.backends.mkldnn.flags(enabled=False):
        assert prepare_input(image) is image
        torch.manual_seed(17)
        network = timm.create_model("contnet_ti", inplanes=8, mlp_dim=(8, 16, 16, 16), num_classes=0).eval()
        for name, stage in stage_maps(network, torch.randn(1, 3, 96, 80)).items():
            assert stage.is_contiguous(), name


def test_gradients_flow_through_the_plain_path() -> None:
    """Training (gradients enabled) still works: the layer's weight gets a gradient."""
    torch.manual_seed(14)
    network = timm.create_model("contnet_ti", inplanes=8, mlp_dim=(8, 16, 16, 16), num_classes=10).train()
    network(torch.randn(2, 3, 64, 64)).sum().backward()
    assert network.layer1.ConTBlock0.ste1.mlp.fc1.weight.grad is not None


def test_exported_graph_has_standard_operators_and_matches_eager() -> None:
    """``torch.export`` sees ``F.linear``, no oneDNN operator; its module equals eager on CPU."""
    torch.manual_seed(15)
    network = timm.create_model("contnet_ti", num_classes=0).eval()
    image = torch.randn(2, 3, 300, 257, generator=torch.Generator().manual_seed(16))
    exported = torch.export.export(network, (image,))
    graph = str(exported.graph)
    with torch.backends.mkldnn.flags(enabled=False):
        assert str(torch.export.export(network, (image,)).graph) == graph  # the CPU paths leave no trace
    assert "mkldnn" not in graph
    assert "aten.linear" in graph
    with torch.no_grad():
        eager = network(image)
        from_export = exported.module()(image)
    assert relative_error(from_export, eager) < 1e-5
