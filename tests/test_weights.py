"""Weight lookup, downloads (real HTTP on 127.0.0.1), checkpoint checks, both shortcut networks and the ``weights`` CLI.

Every model is loaded the way users load it, through ``timm.create_model(..., pretrained=True)``.
Models are ConTNet-Ti or a Ti with 8 stem channels, except the test that loads both shortcut
networks of all four variants. Network access other than 127.0.0.1 is never needed: every
test starts offline and only the download tests switch that off.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import hashlib
import http.server
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
from contnet_stages import stage_maps

from anomalib_contnet.backbones import timm_contnet  # noqa: F401  (registers contnet_* with timm)
from anomalib_contnet.backbones.contnet import ConTNet
from anomalib_contnet.backbones.weight_files import PUBLISHED_URLS, WeightsError, cache_dir, resolve_weights
from anomalib_contnet.cli import main

TINY = {"inplanes": 8, "mlp_dim": (8, 16, 16, 16)}
IMAGE = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
KEY_FILES = Path(__file__).parent / "data" / "contnet_keys"
SPELLING = {False: "downsample.conv.weight", True: "downsample.conv.conv.weight"}
NAME = {False: "strided", True: "avg_down"}


def tiny_model(**changes: object) -> ConTNet:
    """A ConTNet with the Ti layout but 8 stem channels: every block kind, a few hundred KB of weights."""
    return timm.create_model("contnet_ti", **(TINY | changes)).eval()


def pretrained(name: str = "contnet_ti", file: Path | str | None = None, **kwargs: object) -> ConTNet:
    """``timm.create_model(name, pretrained=True)``, from ``file`` when given, else from the package's lookup."""
    overlay = {"pretrained_cfg_overlay": {"file": str(file)}} if file else {}
    return timm.create_model(name, pretrained=True, **overlay, **kwargs).eval()


def assert_same_state(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[key], reference[key]) for key in reference)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private cache, no weights override, offline: a test reaches the network only when it asks to."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(cache))
    monkeypatch.delenv("ANOMALIB_CONTNET_WEIGHTS", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("ANOMALIB_CONTNET_OFFLINE", "1")
    return cache


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")


@pytest.fixture(scope="module")
def ti_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ConTNet-Ti state_dict with the 1000-class head, as the published files hold."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ti") / "contnet_ti.pth"
    torch.save(timm.create_model("contnet_ti").state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------- HTTP test server


@dataclass
class Route:
    body: bytes
    cut_after: int | None = None  # announce the full length, send this many bytes, close
    seconds_per_chunk: float = 0.0


@dataclass
class FileServer:
    """A real HTTP server on 127.0.0.1 that serves byte strings and counts requests per path."""

    base_url: str
    routes: dict[str, Route] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)

    def add(self, path: str, body: bytes, **options: object) -> str:
        self.routes[path] = Route(body, **options)
        return f"{self.base_url}{path}"


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    state: dict[str, FileServer] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server = state["server"]
            server.requests[self.path] += 1
            route = server.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            sent = route.body if route.cut_after is None else route.body[: route.cut_after]
            for start in range(0, len(sent), 1 << 16):
                self.wfile.write(sent[start : start + (1 << 16)])
                time.sleep(route.seconds_per_chunk)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            """Keep test output quiet."""

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["server"] = FileServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state["server"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def closed_port_url(name: str) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------- the lookup


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("ANOMALIB_CONTNET_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "anomalib_contnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "anomalib_contnet"


def test_published_urls() -> None:
    release = "https://github.com/okotaku/timmextension/releases/download/w_contnet"
    assert {"contnet_m": f"{release}/contnet_m.pth", "contnet_b": f"{release}/contnet_b.pth"} == PUBLISHED_URLS


@pytest.mark.usefixtures("online")
def test_resolution_order_explicit_env_cache_url(
    tmp_path: Path, isolated_environment: Path, file_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = file_server.add("/contnet_ti.pth", b"from the url")
    monkeypatch.setitem(PUBLISHED_URLS, "contnet_ti", url)
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"explicit")
    environment = tmp_path / "env.pth"
    environment.write_bytes(b"env")
    cached = isolated_environment / "contnet_ti.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"cache")
    monkeypatch.setenv("ANOMALIB_CONTNET_WEIGHTS", str(environment))

    assert resolve_weights("contnet_ti", explicit) == explicit
    assert resolve_weights("contnet_ti") == environment
    monkeypatch.delenv("ANOMALIB_CONTNET_WEIGHTS")
    assert resolve_weights("contnet_ti") == cached
    assert file_server.requests["/contnet_ti.pth"] == 0
    cached.unlink()
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):  # refused before it lands
        resolve_weights("contnet_ti")
    assert files_in(isolated_environment) == []
    assert file_server.requests["/contnet_ti.pth"] == 1


def test_folders_are_searched_for_the_variant_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "contnet_ti.pth").write_bytes(b"ti")
    assert resolve_weights("contnet_ti", folder) == folder / "contnet_ti.pth"
    monkeypatch.setenv("ANOMALIB_CONTNET_WEIGHTS", str(folder))
    assert resolve_weights("contnet_ti") == folder / "contnet_ti.pth"
    with pytest.raises(WeightsError, match=r"ANOMALIB_CONTNET_WEIGHTS.*holds no contnet_s\.pth"):
        resolve_weights("contnet_s")


def test_named_sources_never_fall_back(
    tmp_path: Path, isolated_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_environment.mkdir()
    (isolated_environment / "contnet_ti.pth").write_bytes(b"cache")
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match=r"nowhere\.pth"):
        resolve_weights("contnet_ti", missing)
    monkeypatch.setenv("ANOMALIB_CONTNET_WEIGHTS", str(missing))
    with pytest.raises(WeightsError, match=r"ANOMALIB_CONTNET_WEIGHTS.*nowhere\.pth"):
        resolve_weights("contnet_ti")
    with pytest.raises(WeightsError, match="contnet_xl"):
        resolve_weights("contnet_xl")


def test_offline_fails_at_once_with_every_remedy(
    file_server: FileServer, monkeypatch: pytest.MonkeyPatch, isolated_environment: Path
) -> None:
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = file_server.add("/contnet_ti.pth", b"never fetched")
    monkeypatch.setitem(PUBLISHED_URLS, "contnet_ti", url)
    with pytest.raises(WeightsError) as raised:
        pretrained("contnet_ti", features_only=True)
    assert file_server.requests["/contnet_ti.pth"] == 0
    for remedy in (
        "HF_HUB_OFFLINE=1",
        url,
        str(isolated_environment / "contnet_ti.pth"),
        "ANOMALIB_CONTNET_WEIGHTS",
        "anomalib-contnet weights import contnet_ti",
        "pre_trained=False",
        "never replaced by random ones",
    ):
        assert remedy in str(raised.value)


@pytest.mark.usefixtures("online")
def test_variant_without_url_explains_where_to_get_it() -> None:
    with pytest.raises(
        WeightsError, match=r"(?s)no stable download URL.*yan-hao-tian/ConTNet.*weights import contnet_s"
    ):
        resolve_weights("contnet_s")
    with pytest.raises(WeightsError, match=rf"(?s)downloading is disabled.*{PUBLISHED_URLS['contnet_b']}"):
        resolve_weights("contnet_b", download=False)


# ------------------------------------------------------------------------------------------------- downloads


@pytest.mark.usefixtures("online")
def test_download_lands_in_cache_and_is_reused(
    file_server: FileServer, isolated_environment: Path, ti_checkpoint: Path
) -> None:
    url = file_server.add("/files/contnet_ti.pth", ti_checkpoint.read_bytes())
    path = resolve_weights("contnet_ti", url)
    assert path == isolated_environment / "contnet_ti.pth"
    assert path.read_bytes() == ti_checkpoint.read_bytes()
    assert resolve_weights("contnet_ti", url) == path
    assert file_server.requests["/files/contnet_ti.pth"] == 1
    assert files_in(isolated_environment) == ["contnet_ti.pth"]


@pytest.mark.usefixtures("online")
def test_failed_downloads_leave_nothing_and_say_what_to_do(
    file_server: FileServer, isolated_environment: Path, ti_checkpoint: Path
) -> None:
    cut = file_server.add("/cut/contnet_ti.pth", ti_checkpoint.read_bytes(), cut_after=70_000)
    started = time.monotonic()
    for url, detail in (
        (cut, "not a readable PyTorch checkpoint"),  # torch.hub cannot tell: the read before the rename does
        (f"{file_server.base_url}/missing/contnet_ti.pth", "404"),
        (closed_port_url("contnet_ti.pth"), "Connection refused"),
    ):
        with pytest.raises(WeightsError, match=detail) as raised:
            resolve_weights("contnet_ti", url)
        assert "ANOMALIB_CONTNET_WEIGHTS" in str(raised.value)
        assert str(isolated_environment / "contnet_ti.pth") in str(raised.value)
        assert files_in(isolated_environment) == []
    assert time.monotonic() - started < 10


@pytest.mark.usefixtures("online")
def test_concurrent_downloads_give_one_intact_file(
    file_server: FileServer, isolated_environment: Path, ti_checkpoint: Path
) -> None:
    body = ti_checkpoint.read_bytes()
    url = file_server.add("/contnet_ti.pth", body, seconds_per_chunk=0.02)  # long enough for the two to overlap
    start = threading.Barrier(2)

    def fetch() -> Path:
        start.wait()
        return resolve_weights("contnet_ti", url)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = [future.result() for future in [pool.submit(fetch), pool.submit(fetch)]]
    assert results == [isolated_environment / "contnet_ti.pth"] * 2
    assert results[0].read_bytes() == body
    assert files_in(isolated_environment) == ["contnet_ti.pth"]  # no temporary file left behind


@pytest.fixture
def unwritable_folder(isolated_environment: Path) -> Iterator[Path]:
    """An existing folder that even root cannot create files in: /proc for root, a mode-0500 folder otherwise."""
    if os.name != "posix":
        pytest.skip("needs POSIX permissions")
    if os.geteuid() == 0:
        yield Path("/proc")
        return
    isolated_environment.mkdir()
    isolated_environment.chmod(0o500)
    yield isolated_environment
    isolated_environment.chmod(0o700)


@pytest.mark.usefixtures("online")
def test_unwritable_cache_folder_is_reported(
    unwritable_folder: Path, file_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(unwritable_folder))
    with pytest.raises(WeightsError, match=r"cannot write into the cache folder.*ANOMALIB_CONTNET_CACHE"):
        resolve_weights("contnet_ti", file_server.add("/contnet_ti.pth", b"payload"))
    assert file_server.requests["/contnet_ti.pth"] == 0
    assert not [name for name in files_in(unwritable_folder) if "contnet_ti" in name]


@pytest.mark.usefixtures("online")
def test_cache_below_a_regular_file_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_server: FileServer
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(blocker / "cache"))
    url = file_server.add("/contnet_ti.pth", b"payload")
    with pytest.raises(WeightsError, match=r"cannot write into the cache folder .*a_file.*ANOMALIB_CONTNET_CACHE"):
        resolve_weights("contnet_ti", url)
    assert file_server.requests["/contnet_ti.pth"] == 0
    assert blocker.read_text() == "not a folder"


# --------------------------------------------------------------------------------- checkpoint forms and checks

CHECKPOINT_FORMS: dict[str, Callable[[dict[str, torch.Tensor]], object]] = {
    "bare": lambda state: state,
    "under_model": lambda state: {"model": state, "epoch": 299, "best_acc1": torch.tensor(81.8)},
    "under_state_dict": lambda state: {"state_dict": state},
    "module_prefix": lambda state: {f"module.{key}": value for key, value in state.items()},
    "authors_ddp_training": lambda state: {
        "model": {f"module.{key}": value for key, value in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "scheduler": {"last_epoch": 299},
        "best_acc1": 81.8,
        "epoch": 299,
    },
}


@pytest.mark.parametrize("form", list(CHECKPOINT_FORMS))
def test_checkpoint_forms_load_with_and_without_the_head(form: str, tmp_path: Path) -> None:
    source = tiny_model()
    path = tmp_path / "checkpoint.pth"
    torch.save(CHECKPOINT_FORMS[form](source.state_dict()), path)
    model = pretrained("contnet_ti", path, **TINY)
    assert model.pretrained_cfg["file"] == str(path)
    assert_same_state(model, source.state_dict())
    with torch.no_grad():
        assert torch.equal(model(IMAGE), source(IMAGE))
    headless = pretrained("contnet_ti", path, num_classes=0, **TINY)
    assert "fc.weight" not in headless.state_dict()
    assert torch.equal(stage_maps(headless, IMAGE)["layer4"], stage_maps(source, IMAGE)["layer4"])


def damaged(kind: str, folder: Path) -> tuple[Path, dict[str, object], str]:
    """Write one kind of bad checkpoint; returns the file, the model arguments, and the error."""
    path = folder / f"{kind}.pth"
    state = tiny_model().state_dict()
    if kind == "truncated":
        good = folder / "good.pth"
        torch.save(state, good)
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return path, TINY, "not a readable PyTorch checkpoint"
    if kind == "other_variant":
        torch.save(timm.create_model("contnet_s").state_dict(), path)  # S weights for a Ti model
        shape = r"copying a param with shape torch\.Size\(\[64, 3, 7, 7\]\)"
        return path, {}, r"does not fit this ConTNet(.|\n)*size mismatch for layer0\.conv\.conv\.weight: " + shape
    if kind == "wrong_shape":
        state["layer2.ConTBlock0.ste1.attn.proj.weight"] = torch.zeros(3, 3)
        torch.save(state, path)
        return path, TINY, r"size mismatch for layer2\.ConTBlock0\.ste1\.attn\.proj\.weight"
    if kind in {"nan", "inf"}:
        state["layer3.ConTBlock0.ste2.mlp.fc1.weight"][0, 0] = float(kind)
        torch.save(state, path)
        return path, TINY, r"layer3\.ConTBlock0\.ste2\.mlp\.fc1\.weight holds 1 NaN/Inf"
    if kind == "missing_head":
        torch.save({key: value for key, value in state.items() if not key.startswith("fc.")}, path)
        return path, TINY, r"num_classes=0(.|\n)*Missing key\(s\) in state_dict: \"fc\.weight\", \"fc\.bias\""
    if kind == "mixed_shortcuts":
        torch.save(
            {
                key.replace("layer1.ConTBlock0.downsample.conv.", "layer1.ConTBlock0.downsample.conv.conv."): value
                for key, value in state.items()
            },
            path,
        )
        return path, TINY, r"mixes both shortcut spellings \(layer1\.ConTBlock0\.downsample\.conv\.conv\.weight"
    if kind == "text":
        path.write_text("this is a README, not a checkpoint\n")
        return path, TINY, "not a readable PyTorch checkpoint"
    if kind == "tensor_only":
        torch.save(torch.zeros(3), path)
        return path, TINY, "holds a Tensor, not a state dict"
    if kind == "not_tensors":
        torch.save({"model": {"layer0.conv.conv.weight": [1, 2, 3]}}, path)
        return path, TINY, "expected torch.Tensor or Tensor-like object from checkpoint"
    if kind == "absent":
        return path, TINY, "holds no contnet_ti.pth"
    raise AssertionError(kind)


DAMAGE_KINDS = [
    "truncated",
    "other_variant",
    "wrong_shape",
    "nan",
    "inf",
    "missing_head",
    "mixed_shortcuts",
    "text",
    "tensor_only",
    "not_tensors",
    "absent",
]


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_bad_checkpoints_are_refused_before_loading(kind: str, tmp_path: Path) -> None:
    path, arguments, detail = damaged(kind, tmp_path)
    with pytest.raises(WeightsError, match=detail) as raised:
        pretrained("contnet_ti", path, **arguments)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("arguments", [{}, {"num_classes": 0}, {"features_only": True}], ids=["head", "no", "features"])
def test_the_file_is_copied_into_the_model_once(
    arguments: dict[str, object], ti_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filter's strict load is the only one that copies: timm's own load then gets the model's tensors."""
    copies: list[bool] = []
    load = ConTNet.load_state_dict

    def recording_load(model: ConTNet, state_dict: dict[str, torch.Tensor], *args: object, **kwargs: object) -> object:
        own = {tensor.data_ptr() for tensor in model.state_dict().values()}
        copies.append(any(tensor.data_ptr() not in own for tensor in state_dict.values()))
        return load(model, state_dict, *args, **kwargs)

    monkeypatch.setattr(ConTNet, "load_state_dict", recording_load)
    pretrained("contnet_ti", ti_checkpoint, **arguments)
    assert copies == [True, False]


def test_sources_other_than_files_are_refused() -> None:
    with pytest.raises(WeightsError, match=r"state_dict and hf_hub_id sources are not supported"):
        timm.create_model("contnet_ti", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": "someone/contnet"})


# ------------------------------------------------------------------------------- the two shortcut networks
# A checkpoint of the strided network and one of the avg-down network, made with our builder and checked against
# the published key files, must come back as the network they were saved from through every way of loading weights,
# and be refused when the other network is forced: that network computes other features from the same tensors.


def key_file(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(key, shape)`` rows of a published key list, in order."""
    rows = [line.split("\t") for line in (KEY_FILES / name).read_text().splitlines() if line.strip()]
    return [(key, tuple(ast.literal_eval(shape))) for key, shape, _dtype in rows]


def respelled(key: str, to_avg_down: bool) -> str:
    """A stride-2 shortcut key in the other network's spelling; every other key unchanged."""
    if not key.startswith(("layer1.", "layer2.", "layer3.")):
        return key
    return key.replace(SPELLING[not to_avg_down], SPELLING[to_avg_down])


def published_keys(variant: str, avg_down: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The published key list of a network; avg-down lists respelled by the rule the two ConT-B lists show."""
    plain = key_file(f"ConT-{variant.removeprefix('contnet_').title()}.tsv")
    assert [(respelled(key, True), shape) for key, shape in key_file("ConT-B.tsv")] == key_file("ConT-B_avgdown.tsv")
    return [(respelled(key, True), shape) for key, shape in plain] if avg_down else plain


@pytest.mark.parametrize("avg_down", [False, True], ids=["strided", "avg_down"])
@pytest.mark.parametrize("variant", ["contnet_ti", "contnet_s", "contnet_m", "contnet_b"])
def test_both_networks_of_every_variant_load_strictly_as_themselves(
    variant: str, avg_down: bool, tmp_path: Path
) -> None:
    torch.manual_seed(2)
    state = timm.create_model(variant, avg_down=avg_down).state_dict()
    assert [(key, tuple(value.shape)) for key, value in state.items()] == published_keys(variant, avg_down)
    path = tmp_path / f"{variant}.pth"
    torch.save({"model": state}, path)
    model = pretrained(variant, path)
    assert model.config.avg_down is avg_down
    assert_same_state(model, state)
    with pytest.raises(WeightsError, match=rf"avg_down={not avg_down} asks for the {NAME[not avg_down]} shortcut"):
        pretrained(variant, path, avg_down=not avg_down)


@dataclass(frozen=True)
class SavedNetwork:
    """A checkpoint file of one shortcut network and the stage outputs of the model it was saved from."""

    avg_down: bool
    path: Path
    state: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def ti_networks(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, SavedNetwork]:
    """ConTNet-Ti of each shortcut network (Ti's stages 1-3 end in stride-2 blocks too), saved as published files."""
    folder = tmp_path_factory.mktemp("shortcut_networks")
    networks = {}
    for avg_down in (False, True):
        torch.manual_seed(7)  # same tensors for both: only the shortcut computation differs
        source = timm.create_model("contnet_ti", avg_down=avg_down).eval()
        path = folder / NAME[avg_down] / "contnet_ti.pth"
        path.parent.mkdir()
        torch.save(source.state_dict(), path)
        networks[avg_down] = SavedNetwork(avg_down, path, source.state_dict(), stage_maps(source, IMAGE))
    return networks


@pytest.mark.parametrize("avg_down", [False, True], ids=["strided", "avg_down"])
def test_the_other_network_computes_other_features_from_the_same_tensors(
    ti_networks: dict[bool, SavedNetwork], avg_down: bool
) -> None:
    """Why the spellings are never mapped: renamed into the other network, the weights compute other features."""
    saved = ti_networks[avg_down]
    other = timm.create_model("contnet_ti", avg_down=not avg_down).eval()
    other.load_state_dict({respelled(key, not avg_down): value for key, value in saved.state.items()}, strict=True)
    features = stage_maps(other, IMAGE)
    assert torch.equal(features["layer0"], saved.outputs["layer0"])  # the stem has no shortcut
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert not torch.allclose(features[name], saved.outputs[name], rtol=1e-3, atol=1e-3), name


def from_overlay_file(saved: SavedNetwork, **_: object) -> dict[str, object]:
    return {"pretrained_cfg_overlay": {"file": str(saved.path)}}


def from_environment(saved: SavedNetwork, monkeypatch: pytest.MonkeyPatch, **_: object) -> dict[str, object]:
    monkeypatch.setenv("ANOMALIB_CONTNET_WEIGHTS", str(saved.path.parent))  # a folder holding contnet_ti.pth
    return {}


def from_cache(saved: SavedNetwork, cache: Path, **_: object) -> dict[str, object]:
    cache.mkdir()
    shutil.copyfile(saved.path, cache / "contnet_ti.pth")
    return {}


def from_default_download(
    saved: SavedNetwork, monkeypatch: pytest.MonkeyPatch, server: FileServer, **_: object
) -> dict[str, object]:
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")
    monkeypatch.setitem(PUBLISHED_URLS, "contnet_ti", server.add("/w_contnet/contnet_ti.pth", saved.path.read_bytes()))
    return {}


def from_overlay_url(
    saved: SavedNetwork, monkeypatch: pytest.MonkeyPatch, server: FileServer, **_: object
) -> dict[str, object]:
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")
    return {"pretrained_cfg_overlay": {"url": server.add("/mirror/contnet_ti.pth", saved.path.read_bytes())}}


def after_weights_import(saved: SavedNetwork, capsys: pytest.CaptureFixture[str], **_: object) -> dict[str, object]:
    assert main(["weights", "import", "contnet_ti", str(saved.path)]) == 0
    assert f"({NAME[saved.avg_down]} shortcut)" in capsys.readouterr().out
    return {}


def after_weights_download(
    saved: SavedNetwork, server: FileServer, capsys: pytest.CaptureFixture[str], **_: object
) -> dict[str, object]:
    url = server.add("/mirror/contnet_ti.pth", saved.path.read_bytes())
    assert main(["weights", "download", "contnet_ti", "--url", url]) == 0
    assert f"({NAME[saved.avg_down]} shortcut)" in capsys.readouterr().out
    return {}


SOURCES: dict[str, Callable[..., dict[str, object]]] = {
    "overlay_file": from_overlay_file,
    "environment_variable": from_environment,
    "cache": from_cache,
    "default_download": from_default_download,
    "overlay_url": from_overlay_url,
    "weights_import": after_weights_import,
    "weights_download": after_weights_download,
}


@pytest.mark.parametrize("avg_down", [False, True], ids=["strided", "avg_down"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_every_source_builds_the_network_the_checkpoint_was_saved_from(
    source: str,
    avg_down: bool,
    ti_networks: dict[bool, SavedNetwork],
    isolated_environment: Path,
    monkeypatch: pytest.MonkeyPatch,
    file_server: FileServer,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    saved = ti_networks[avg_down]
    arguments = SOURCES[source](
        saved, monkeypatch=monkeypatch, cache=isolated_environment, server=file_server, capsys=capsys
    )
    caplog.set_level(logging.INFO, logger="anomalib_contnet.backbones.timm_contnet")
    model = timm.create_model("contnet_ti", pretrained=True, features_only=True, **arguments).eval()
    assert f"layer1.ConTBlock0.{SPELLING[avg_down]}" in model.state_dict()
    with torch.no_grad():
        features = dict(zip(model.feature_info.module_name(), model(IMAGE), strict=True))
    assert all(torch.equal(value, saved.outputs[name]) for name, value in features.items())
    assert f"building contnet_ti with the {NAME[avg_down]} shortcut of " in caplog.text
    with pytest.raises(WeightsError, match=rf"avg_down={not avg_down} asks for the {NAME[not avg_down]} shortcut"):
        timm.create_model("contnet_ti", pretrained=True, avg_down=not avg_down, **arguments)
    assert all(count == 1 for count in file_server.requests.values())  # downloaded once, then from the cache


def test_a_respelled_checkpoint_builds_the_network_its_keys_name(
    ti_networks: dict[bool, SavedNetwork], tmp_path: Path
) -> None:
    """Renaming the shortcut keys makes a checkpoint of the other network: it is built as that, never as the source."""
    saved = ti_networks[False]
    path = tmp_path / "contnet_ti.pth"
    torch.save({respelled(key, True): value for key, value in saved.state.items()}, path)
    model = pretrained("contnet_ti", path)
    assert model.config.avg_down is True
    assert not torch.allclose(stage_maps(model, IMAGE)["layer1"], saved.outputs["layer1"])


# ------------------------------------------------------------------------------------------------------- CLI


def listed(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``weights list``: {variant: its line}."""
    assert main(["weights", "list"]) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("contnet_")}


def test_cli_list_shows_where_each_file_is_and_its_url(
    ti_checkpoint: Path, isolated_environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = listed(capsys)
    assert before["contnet_b"].split()[1:3] == ["missing", str(isolated_environment / "contnet_b.pth")]
    assert PUBLISHED_URLS["contnet_b"] in before["contnet_b"]
    assert "no stable URL" in before["contnet_s"]
    assert main(["weights", "import", "contnet_ti", str(ti_checkpoint)]) == 0
    capsys.readouterr()
    assert listed(capsys)["contnet_ti"].split()[1:3] == ["cached", str(isolated_environment / "contnet_ti.pth")]
    monkeypatch.setenv("ANOMALIB_CONTNET_WEIGHTS", str(ti_checkpoint.parent))
    assert listed(capsys)["contnet_ti"].split()[1:3] == ["found", str(ti_checkpoint)]


def test_cli_import_checks_the_file_first(
    capsys: pytest.CaptureFixture[str], isolated_environment: Path, ti_checkpoint: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "tiny.pth"
    torch.save(tiny_model().state_dict(), wrong)
    assert main(["weights", "import", "contnet_ti", str(wrong)]) == 2
    error = capsys.readouterr().err
    assert str(wrong) in error
    assert "size mismatch" in error
    assert "Traceback" not in error
    assert files_in(isolated_environment) == []

    assert main(["weights", "import", "contnet_ti", str(ti_checkpoint)]) == 0
    destination = isolated_environment / "contnet_ti.pth"
    assert str(destination) in capsys.readouterr().out
    assert destination.read_bytes() == ti_checkpoint.read_bytes()
    assert files_in(isolated_environment) == ["contnet_ti.pth"]
    assert_same_state(pretrained("contnet_ti"), torch.load(ti_checkpoint, weights_only=True))


def test_cli_download(
    capsys: pytest.CaptureFixture[str], isolated_environment: Path, ti_checkpoint: Path, file_server: FileServer
) -> None:
    body = ti_checkpoint.read_bytes()
    url = file_server.add("/mirror/contnet_ti.pth", body)
    assert main(["weights", "download", "contnet_ti", "--url", url, "--sha256", "1" * 64]) == 2
    assert "invalid hash value" in capsys.readouterr().err
    assert files_in(isolated_environment) == []

    digest = hashlib.sha256(body).hexdigest()
    assert main(["weights", "download", "contnet_ti", "--url", url, "--sha256", digest[:12]]) == 0
    assert (isolated_environment / "contnet_ti.pth").read_bytes() == body
    assert main(["weights", "download", "contnet_ti", "--url", url]) == 0
    assert "already cached" in capsys.readouterr().out
    assert file_server.requests["/mirror/contnet_ti.pth"] == 2
    assert main(["weights", "download", "contnet_ti", "--url", url, "--force"]) == 0
    assert file_server.requests["/mirror/contnet_ti.pth"] == 3


def test_cli_download_refuses_a_file_that_does_not_load(
    capsys: pytest.CaptureFixture[str], isolated_environment: Path, file_server: FileServer, tmp_path: Path
) -> None:
    other_variant = tmp_path / "contnet_s.pth"
    torch.save(timm.create_model("contnet_s").state_dict(), other_variant)
    for body in (b"<html>rate limited</html>", other_variant.read_bytes()):
        url = file_server.add("/contnet_ti.pth", body)
        assert main(["weights", "download", "contnet_ti", "--url", url]) == 2
        assert f"{url} is not a usable contnet_ti checkpoint (nothing was cached)" in capsys.readouterr().err
        assert files_in(isolated_environment) == []
    assert main(["weights", "download", "contnet_s"]) == 2
    assert "no stable download URL" in capsys.readouterr().err


def console_script() -> Path | None:
    beside_python = Path(sys.executable).with_name("anomalib-contnet")
    found = beside_python if beside_python.exists() else shutil.which("anomalib-contnet")
    return Path(found) if found else None


@pytest.mark.skipif(console_script() is None, reason="package not installed (pip install -e .)")
def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    environment = os.environ | {"ANOMALIB_CONTNET_CACHE": str(tmp_path / "cache"), "ANOMALIB_CONTNET_OFFLINE": "1"}
    with contextlib.suppress(KeyError):
        del environment["ANOMALIB_CONTNET_WEIGHTS"]
    result = subprocess.run(
        [str(console_script()), "weights", "import", "contnet_ti", str(text)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert str(text) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache" / "contnet_ti.pth").exists()
