"""Weight resolution, downloads (real HTTP on 127.0.0.1), checkpoint validation and the ``weights`` CLI.

Models are a tiny ConTNet config or ConTNet-Ti, so most of the file runs in seconds; the
shortcut-network section also builds two random ConTNet-B, because only B has key
files of both shortcut networks.
Network access other than 127.0.0.1 is never needed: every test starts in
offline mode and only the download tests switch it off.
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
import torch
from contnet_stages import stage_maps

from anomalib_contnet.backbones.contnet import ConTNet, create_contnet
from anomalib_contnet.backbones.contnet_configs import ConTNetConfig
from anomalib_contnet.backbones.weight_files import (
    PUBLISHED_WEIGHTS,
    PublishedWeights,
    WeightsError,
    cache_dir,
    download,
    resolve_weights,
)
from anomalib_contnet.backbones.weights import load_checkpoint_file, pretrained_contnet, validated_state_dict
from anomalib_contnet.cli import main

GOLDEN = Path(__file__).parent / "data" / "contnet_tiny_golden.pt"
TINY = {"inplanes": 8, "mlp_dim": (8, 16, 16, 16), "num_classes": 10}
IMAGE = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def tiny_model(**changes: object) -> ConTNet:
    """A ConTNet with the Ti layout but 8 stem channels: every block kind, a few hundred KB of weights."""
    return create_contnet("contnet_ti", **(TINY | changes)).eval()


def outputs(model: ConTNet) -> dict[str, torch.Tensor]:
    return stage_maps(model, IMAGE)


def assert_same_state(model: ConTNet, reference: dict[str, torch.Tensor]) -> None:
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
    torch.save(create_contnet("contnet_ti").state_dict(), path)
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
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server = state["server"]
            with lock:
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


# ------------------------------------------------------------------------------------------------- cache folder


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("ANOMALIB_CONTNET_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "anomalib_contnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "anomalib_contnet"


def test_published_table() -> None:
    release = "https://github.com/okotaku/timmextension/releases/download/w_contnet"
    assert PUBLISHED_WEIGHTS["contnet_b"].url == f"{release}/contnet_b.pth"
    assert PUBLISHED_WEIGHTS["contnet_m"].url == f"{release}/contnet_m.pth"
    assert PUBLISHED_WEIGHTS["contnet_ti"].url is None
    assert PUBLISHED_WEIGHTS["contnet_s"].url is None
    assert {entry.file_name for entry in PUBLISHED_WEIGHTS.values()} == {
        "contnet_ti.pth",
        "contnet_s.pth",
        "contnet_m.pth",
        "contnet_b.pth",
    }
    assert all(entry.sha256 is None for entry in PUBLISHED_WEIGHTS.values())


# ------------------------------------------------------------------------------------------- resolution order


@pytest.mark.usefixtures("online")
def test_resolution_order_explicit_env_cache_url(
    tmp_path: Path, isolated_environment: Path, file_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = file_server.add("/contnet_ti.pth", b"from the url")
    monkeypatch.setitem(PUBLISHED_WEIGHTS, "contnet_ti", PublishedWeights("contnet_ti", "contnet_ti.pth", url))
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
    assert resolve_weights("contnet_ti") == cached
    assert cached.read_bytes() == b"from the url"
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


def test_unknown_variant() -> None:
    with pytest.raises(WeightsError, match="contnet_xl"):
        resolve_weights("contnet_xl")


def test_offline_fails_at_once_with_every_remedy(
    file_server: FileServer, monkeypatch: pytest.MonkeyPatch, isolated_environment: Path
) -> None:
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = file_server.add("/contnet_ti.pth", b"never fetched")
    monkeypatch.setitem(PUBLISHED_WEIGHTS, "contnet_ti", PublishedWeights("contnet_ti", "contnet_ti.pth", url))
    with pytest.raises(WeightsError) as raised:
        resolve_weights("contnet_ti")
    assert file_server.requests["/contnet_ti.pth"] == 0
    message = str(raised.value)
    for remedy in (
        "HF_HUB_OFFLINE=1",
        url,
        str(isolated_environment / "contnet_ti.pth"),
        "ANOMALIB_CONTNET_WEIGHTS",
        "anomalib-contnet weights import contnet_ti",
        "pre_trained=False",
    ):
        assert remedy in message


def test_offline_message_for_contnet_b_names_the_release_url(isolated_environment: Path) -> None:
    with pytest.raises(WeightsError) as raised:
        resolve_weights("contnet_b")
    assert PUBLISHED_WEIGHTS["contnet_b"].url in str(raised.value)
    assert str(isolated_environment / "contnet_b.pth") in str(raised.value)


@pytest.mark.usefixtures("online")
def test_variant_without_url_explains_where_to_get_it() -> None:
    with pytest.raises(
        WeightsError, match=r"(?s)no stable download URL.*yan-hao-tian/ConTNet.*weights import contnet_s"
    ):
        resolve_weights("contnet_s")
    with pytest.raises(WeightsError, match="downloading is disabled"):
        resolve_weights("contnet_b", download=False)


# ------------------------------------------------------------------------------------------------- downloads


@pytest.mark.usefixtures("online")
def test_download_lands_in_cache_and_is_reused(file_server: FileServer, isolated_environment: Path) -> None:
    body = os.urandom(300_000)
    url = file_server.add("/files/contnet_ti.pth", body)
    path = resolve_weights("contnet_ti", url, sha256=hashlib.sha256(body).hexdigest())
    assert path == isolated_environment / "contnet_ti.pth"
    assert path.read_bytes() == body
    assert resolve_weights("contnet_ti", url) == path
    assert file_server.requests["/files/contnet_ti.pth"] == 1
    assert files_in(isolated_environment) == ["contnet_ti.pth"]


@pytest.mark.usefixtures("online")
def test_transfer_cut_short_leaves_nothing(file_server: FileServer, isolated_environment: Path) -> None:
    url = file_server.add("/contnet_ti.pth", os.urandom(200_000), cut_after=70_000)
    with pytest.raises(WeightsError, match=r"70000 of 200000 bytes"):
        resolve_weights("contnet_ti", url)
    assert files_in(isolated_environment) == []


@pytest.mark.usefixtures("online")
def test_wrong_sha256_leaves_nothing(file_server: FileServer, isolated_environment: Path) -> None:
    url = file_server.add("/contnet_ti.pth", b"payload")
    with pytest.raises(WeightsError, match="SHA-256"):
        resolve_weights("contnet_ti", url, sha256="0" * 64)
    assert files_in(isolated_environment) == []
    with pytest.raises(WeightsError, match="not a SHA-256"):
        resolve_weights("contnet_ti", url, sha256="abc")


@pytest.mark.usefixtures("online")
def test_http_error_is_reported(file_server: FileServer, isolated_environment: Path) -> None:
    with pytest.raises(WeightsError, match="HTTP 404"):
        resolve_weights("contnet_ti", f"{file_server.base_url}/missing/contnet_ti.pth")
    assert files_in(isolated_environment) == []


@pytest.mark.usefixtures("online")
def test_unreachable_server_fails_fast_with_remedies(isolated_environment: Path) -> None:
    started = time.monotonic()
    with pytest.raises(WeightsError) as raised:
        resolve_weights("contnet_ti", closed_port_url("contnet_ti.pth"))
    assert time.monotonic() - started < 5
    assert "ANOMALIB_CONTNET_WEIGHTS" in str(raised.value)
    assert str(isolated_environment / "contnet_ti.pth") in str(raised.value)
    assert files_in(isolated_environment) == []


def test_concurrent_downloads_give_one_intact_file(file_server: FileServer, isolated_environment: Path) -> None:
    body = os.urandom(1 << 20)
    url = file_server.add("/contnet_ti.pth", body, seconds_per_chunk=0.05)  # 16 chunks: ~0.8 s per transfer
    destination = isolated_environment / "contnet_ti.pth"
    start = threading.Barrier(2)

    def fetch() -> Path:
        start.wait()
        return download(url, destination, progress=False)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = [future.result() for future in [pool.submit(fetch), pool.submit(fetch)]]
    assert results == [destination, destination]
    assert destination.read_bytes() == body
    assert files_in(isolated_environment) == ["contnet_ti.pth"]
    assert file_server.requests["/contnet_ti.pth"] == 1  # the second caller waited and reused the file


@pytest.mark.usefixtures("online")
def test_cache_below_a_regular_file_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_server: FileServer
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ANOMALIB_CONTNET_CACHE", str(blocker / "cache"))
    url = file_server.add("/contnet_ti.pth", b"payload")
    with pytest.raises(WeightsError, match=r"cannot create the cache folder .*a_file.*ANOMALIB_CONTNET_CACHE"):
        resolve_weights("contnet_ti", url)
    assert file_server.requests["/contnet_ti.pth"] == 0
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def unwritable_folder(isolated_environment: Path) -> Iterator[Path]:
    """An existing folder that even root cannot create files in: /proc for root, a mode-0500 folder otherwise."""
    if os.name != "posix":
        pytest.skip("needs POSIX permissions")
    if os.geteuid() == 0:
        if not Path("/proc/self").is_dir():
            pytest.skip("root ignores folder permissions and there is no procfs")
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
    assert not [name for name in files_in(unwritable_folder) if name.startswith((".contnet_ti", "contnet_ti"))]


# --------------------------------------------------------------------------------- checkpoint forms and loading


def rename_keys(state: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    return {mapping.get(key, key): value for key, value in state.items()}


def shortcut_spellings() -> dict[str, str]:
    """Plain -> avg-down key names, found by comparing the two tiny models' key lists."""
    plain, avg_down = tiny_model().state_dict(), tiny_model(avg_down=True).state_dict()
    mapping = {old: new for old, new in zip(plain, avg_down, strict=True) if old != new}
    assert len(mapping) == 3  # the strided shortcuts of stages 1-3
    return mapping


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
def test_checkpoint_forms_round_trip(form: str, tmp_path: Path) -> None:
    source = tiny_model()
    path = tmp_path / "checkpoint.pth"
    torch.save(CHECKPOINT_FORMS[form](source.state_dict()), path)
    target = pretrained_contnet("contnet_ti", path, **TINY).eval()
    assert_same_state(target, source.state_dict())
    expected, actual = outputs(source), outputs(target)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


@pytest.mark.parametrize("avg_down_source", [False, True])
def test_respelled_shortcut_builds_the_network_the_keys_name(avg_down_source: bool, tmp_path: Path) -> None:
    """Renaming the shortcut keys makes it a checkpoint of the other network: it is built as that, never as the source.

    The loader used to rename keys back into the source's spelling, which made
    this file load into the source architecture and reproduce its outputs.
    """
    mapping = shortcut_spellings()
    if avg_down_source:
        mapping = {new: old for old, new in mapping.items()}
    source = tiny_model(avg_down=avg_down_source)
    path = tmp_path / "respelled.pth"
    torch.save(rename_keys(source.state_dict(), mapping), path)
    with pytest.raises(WeightsError, match=rf"avg_down={avg_down_source} asks for"):
        pretrained_contnet("contnet_ti", path, avg_down=avg_down_source, **TINY)
    target = pretrained_contnet("contnet_ti", path, **TINY).eval()
    assert target.config.avg_down is not avg_down_source
    assert not torch.allclose(outputs(target)["layer1"], outputs(source)["layer1"])


@pytest.mark.parametrize("with_fc", [True, False])
def test_checkpoint_into_headless_model(with_fc: bool, tmp_path: Path) -> None:
    source = tiny_model()
    state = {key: value for key, value in source.state_dict().items() if with_fc or not key.startswith("fc.")}
    path = tmp_path / "weights.pth"
    torch.save({"model": state}, path)
    target = pretrained_contnet("contnet_ti", path, **(TINY | {"num_classes": 0})).eval()
    assert "fc.weight" not in target.state_dict()
    assert torch.equal(outputs(target)["layer4"], outputs(source)["layer4"])


def test_golden_state_dict_in_the_authors_training_form(tmp_path: Path) -> None:
    golden = torch.load(GOLDEN, weights_only=True)
    path = tmp_path / "checkpoint_bestTop1.pth"
    torch.save(CHECKPOINT_FORMS["authors_ddp_training"](golden["state_dict"]), path)
    model = pretrained_contnet("contnet_m", path, **golden["config"]).eval()
    assert model.config == ConTNetConfig(**golden["config"])
    with torch.no_grad():
        logits = model(golden["input"])
    expected = golden["outputs"]["logits"]
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-5


def test_pretrained_contnet_with_weights_and_sha256(ti_checkpoint: Path) -> None:
    digest = hashlib.sha256(ti_checkpoint.read_bytes()).hexdigest()
    model = pretrained_contnet("contnet_ti", str(ti_checkpoint))
    assert_same_state(model, torch.load(ti_checkpoint, weights_only=True))
    pinned = pretrained_contnet("contnet_ti", ti_checkpoint, sha256=digest.upper())
    assert_same_state(pinned, model.state_dict())
    with pytest.raises(WeightsError, match=r"contnet_ti\.pth has SHA-256"):
        pretrained_contnet("contnet_ti", ti_checkpoint, sha256="f" * 64)


def damaged(kind: str, folder: Path) -> tuple[Path, dict[str, object], str]:
    """Write one kind of bad checkpoint; returns the file, the pretrained_contnet overrides, and the error."""
    path = folder / f"{kind}.pth"
    state = tiny_model().state_dict()
    if kind == "truncated":
        good = folder / "good.pth"
        torch.save(state, good)
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return path, TINY, "not a readable PyTorch checkpoint"
    if kind == "other_variant":
        torch.save(create_contnet("contnet_s").state_dict(), path)  # S weights for a Ti model
        return path, {}, r"wrong shape: layer0\.conv\.conv\.weight \(64, 3, 7, 7\)"
    if kind == "wrong_shape":
        state["layer2.ConTBlock0.ste1.attn.proj.weight"] = torch.zeros(3, 3)
        torch.save(state, path)
        return path, TINY, r"1 wrong shape: layer2\.ConTBlock0\.ste1\.attn\.proj\.weight"
    if kind in {"nan", "inf"}:
        state["layer3.ConTBlock0.ste2.mlp.fc1.weight"][0, 0] = float(kind)
        torch.save(state, path)
        return path, TINY, r"layer3\.ConTBlock0\.ste2\.mlp\.fc1\.weight holds 1 NaN/Inf"
    if kind == "missing_head":
        torch.save({key: value for key, value in state.items() if not key.startswith("fc.")}, path)
        return path, TINY, r"2 missing: fc\.weight, fc\.bias.*num_classes=0"
    if kind == "mixed_shortcuts":
        first = next(iter(shortcut_spellings().items()))  # only stage 1 respelled as avg-down
        torch.save(rename_keys(state, dict([first])), path)
        return path, TINY, r"mixes both shortcut spellings \(layer1\.ConTBlock0\.downsample\.conv\.conv\.weight"
    if kind == "text":
        path.write_text("this is a README, not a checkpoint\n")
        return path, TINY, "not a readable PyTorch checkpoint"
    if kind == "tensor_only":
        torch.save(torch.zeros(3), path)
        return path, TINY, "holds a Tensor, not a checkpoint"
    if kind == "not_tensors":
        torch.save({"model": {"layer0.conv.conv.weight": [1, 2, 3]}}, path)
        return path, TINY, "expected a tensor"
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
]


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_bad_checkpoints_are_rejected_before_loading(kind: str, tmp_path: Path) -> None:
    path, overrides, detail = damaged(kind, tmp_path)
    with pytest.raises(WeightsError, match=detail) as raised:
        pretrained_contnet("contnet_ti", path, **overrides)
    assert str(path) in str(raised.value)


def test_load_checkpoint_file_reads_on_cpu(ti_checkpoint: Path) -> None:
    checkpoint = load_checkpoint_file(ti_checkpoint)
    assert all(value.device.type == "cpu" for value in checkpoint.values())
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint_file(ti_checkpoint.with_name("absent.pth"))


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_list(capsys: pytest.CaptureFixture[str], isolated_environment: Path, ti_checkpoint: Path) -> None:
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert str(isolated_environment) in listing
    for name in ("contnet_ti", "contnet_b"):
        line = next(line for line in listing.splitlines() if line.startswith(f"{name} "))
        assert "missing" in line
        assert str(isolated_environment / f"{name}.pth") in line
    assert PUBLISHED_WEIGHTS["contnet_b"].url in listing
    assert main(["weights", "import", "contnet_ti", str(ti_checkpoint)]) == 0
    capsys.readouterr()  # the import's own message also starts with the variant's name
    assert main(["weights", "list"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("contnet_ti "))
    assert " cached " in line


def test_cli_import_then_pretrained_loads_it(
    capsys: pytest.CaptureFixture[str], isolated_environment: Path, ti_checkpoint: Path
) -> None:
    assert main(["weights", "import", "contnet_ti", str(ti_checkpoint)]) == 0
    destination = isolated_environment / "contnet_ti.pth"
    assert str(destination) in capsys.readouterr().out
    assert destination.read_bytes() == ti_checkpoint.read_bytes()
    assert files_in(isolated_environment) == ["contnet_ti.pth"]
    model = pretrained_contnet("contnet_ti")
    assert_same_state(model, torch.load(ti_checkpoint, weights_only=True))


def test_cli_import_rejects_a_file_of_another_model(
    capsys: pytest.CaptureFixture[str], isolated_environment: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "tiny.pth"
    torch.save(tiny_model().state_dict(), wrong)
    assert main(["weights", "import", "contnet_ti", str(wrong)]) == 2
    captured = capsys.readouterr()
    assert str(wrong) in captured.err
    assert "wrong shape" in captured.err
    assert "Traceback" not in captured.err
    assert files_in(isolated_environment) == []


def test_cli_download(
    capsys: pytest.CaptureFixture[str], isolated_environment: Path, ti_checkpoint: Path, file_server: FileServer
) -> None:
    body = ti_checkpoint.read_bytes()
    url = file_server.add("/mirror/contnet_ti.pth", body)
    assert main(["weights", "download", "contnet_ti", "--url", url, "--sha256", "1" * 64]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert files_in(isolated_environment) == []

    digest = hashlib.sha256(body).hexdigest()
    assert main(["weights", "download", "contnet_ti", "--url", url, "--sha256", digest]) == 0
    assert (isolated_environment / "contnet_ti.pth").read_bytes() == body
    assert main(["weights", "download", "contnet_ti", "--url", url]) == 0
    assert "already cached" in capsys.readouterr().out
    assert file_server.requests["/mirror/contnet_ti.pth"] == 2
    assert main(["weights", "download", "contnet_ti", "--url", url, "--force"]) == 0
    assert file_server.requests["/mirror/contnet_ti.pth"] == 3


def test_cli_download_rejects_a_file_that_does_not_load(
    capsys: pytest.CaptureFixture[str], isolated_environment: Path, file_server: FileServer
) -> None:
    url = file_server.add("/contnet_ti.pth", b"<html>rate limited</html>")
    assert main(["weights", "download", "contnet_ti", "--url", url]) == 2
    assert "did not deliver a usable contnet_ti checkpoint" in capsys.readouterr().err
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


# ------------------------------------------------------------------------------- the two shortcut networks
# A checkpoint of the strided network and one of the avg-down network, made with our builder and checked against
# the published key files, must come back as the network they were saved from through every way of loading weights,
# and be refused when the other network is forced: that network computes other features from the same tensors.

KEY_FILES = Path(__file__).parent / "data" / "contnet_keys"
SPELLING = {False: "downsample.conv", True: "downsample.conv.conv"}
LABEL = {False: "strided", True: "avg-down"}


def key_file(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(key, shape)`` rows of a published key list, in order."""
    rows = [line.split("\t") for line in (KEY_FILES / name).read_text().splitlines() if line.strip()]
    return [(key, tuple(ast.literal_eval(shape))) for key, shape, _dtype in rows]


def respelled(key: str, to_avg_down: bool) -> str:
    """A stride-2 shortcut key in the other network's spelling; every other key unchanged."""
    if not key.startswith(("layer1.", "layer2.", "layer3.")) or ".downsample." not in key:
        return key
    return key.replace(f"{SPELLING[not to_avg_down]}.weight", f"{SPELLING[to_avg_down]}.weight")


def avg_down_key_file(plain_file: str) -> list[tuple[str, tuple[int, ...]]]:
    """A strided key list respelled as avg-down, by the rule that the two published ConT-B lists show."""
    plain, avg_down = key_file("ConT-B.tsv"), key_file("ConT-B_avgdown.tsv")
    assert [(respelled(key, True), shape) for key, shape in plain] == avg_down
    return [(respelled(key, True), shape) for key, shape in key_file(plain_file)]


def state_rows(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in state.items()]


def assert_same_outputs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-6, msg=name)


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
    expected = {False: key_file("ConT-Ti.tsv"), True: avg_down_key_file("ConT-Ti.tsv")}
    networks = {}
    for avg_down in (False, True):
        torch.manual_seed(7)  # same tensors for both: only the shortcut computation differs
        source = create_contnet("contnet_ti", avg_down=avg_down).eval()
        state = source.state_dict()
        assert state_rows(state) == expected[avg_down]
        path = folder / LABEL[avg_down] / "contnet_ti.pth"
        path.parent.mkdir()
        torch.save(state, path)
        networks[avg_down] = SavedNetwork(avg_down, path, state, outputs(source))
    return networks


@pytest.mark.parametrize("avg_down", [False, True], ids=["strided", "avg_down"])
def test_the_other_network_computes_other_features_from_the_same_tensors(
    ti_networks: dict[bool, SavedNetwork], avg_down: bool
) -> None:
    """Why the spellings must not be mapped: renamed into the other network, the weights compute other features."""
    saved = ti_networks[avg_down]
    other = create_contnet("contnet_ti", avg_down=not avg_down).eval()
    renamed = {respelled(key, not avg_down): value for key, value in saved.state.items()}  # the old loader's mapping
    other.load_state_dict(renamed, strict=True)  # loads without any error
    features = outputs(other)
    assert torch.equal(features["layer0"], saved.outputs["layer0"])  # the stem has no shortcut
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert not torch.allclose(features[name], saved.outputs[name], rtol=1e-3, atol=1e-3), name


def load_from_explicit_file(saved: SavedNetwork, **_: object) -> dict[str, object]:
    return {"weights": str(saved.path)}


def load_from_environment(saved: SavedNetwork, monkeypatch: pytest.MonkeyPatch, **_: object) -> dict[str, object]:
    monkeypatch.setenv("ANOMALIB_CONTNET_WEIGHTS", str(saved.path.parent))  # a folder holding contnet_ti.pth
    return {}


def load_from_cache(saved: SavedNetwork, cache: Path, **_: object) -> dict[str, object]:
    cache.mkdir()
    shutil.copyfile(saved.path, cache / "contnet_ti.pth")
    return {}


def load_from_default_download(
    saved: SavedNetwork, monkeypatch: pytest.MonkeyPatch, server: FileServer, **_: object
) -> dict[str, object]:
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")
    url = server.add("/w_contnet/contnet_ti.pth", saved.path.read_bytes())
    monkeypatch.setitem(PUBLISHED_WEIGHTS, "contnet_ti", PublishedWeights("contnet_ti", "contnet_ti.pth", url))
    return {}


def load_from_url(
    saved: SavedNetwork, monkeypatch: pytest.MonkeyPatch, server: FileServer, **_: object
) -> dict[str, object]:
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")
    return {"weights": server.add("/mirror/contnet_ti.pth", saved.path.read_bytes())}


def load_after_weights_import(
    saved: SavedNetwork, capsys: pytest.CaptureFixture[str], **_: object
) -> dict[str, object]:
    assert main(["weights", "import", "contnet_ti", str(saved.path)]) == 0
    assert f"({LABEL[saved.avg_down]} shortcut: the file spells {SPELLING[saved.avg_down]})" in capsys.readouterr().out
    return {}


def load_after_weights_download(
    saved: SavedNetwork, server: FileServer, capsys: pytest.CaptureFixture[str], **_: object
) -> dict[str, object]:
    url = server.add("/mirror/contnet_ti.pth", saved.path.read_bytes())
    assert main(["weights", "download", "contnet_ti", "--url", url]) == 0
    assert f"({LABEL[saved.avg_down]} shortcut: the file spells {SPELLING[saved.avg_down]})" in capsys.readouterr().out
    return {}


ENTRY_POINTS: dict[str, Callable[..., dict[str, object]]] = {
    "explicit_file": load_from_explicit_file,
    "environment_variable": load_from_environment,
    "cache": load_from_cache,
    "default_download": load_from_default_download,
    "explicit_url": load_from_url,
    "weights_import": load_after_weights_import,
    "weights_download": load_after_weights_download,
}


@pytest.mark.parametrize("avg_down", [False, True], ids=["strided", "avg_down"])
@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_every_entry_point_builds_the_network_the_checkpoint_was_saved_from(
    entry_point: str,
    avg_down: bool,
    ti_networks: dict[bool, SavedNetwork],
    isolated_environment: Path,
    monkeypatch: pytest.MonkeyPatch,
    file_server: FileServer,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    saved = ti_networks[avg_down]
    source = ENTRY_POINTS[entry_point](
        saved, monkeypatch=monkeypatch, cache=isolated_environment, server=file_server, capsys=capsys
    )
    caplog.set_level(logging.INFO, logger="anomalib_contnet.backbones.weights")
    model = pretrained_contnet("contnet_ti", **source).eval()
    assert model.config.avg_down is avg_down
    assert_same_outputs(outputs(model), saved.outputs)
    assert f"built contnet_ti with the {LABEL[avg_down]} shortcut: " in caplog.text
    assert f" spells {SPELLING[avg_down]}\n" in caplog.text
    with pytest.raises(WeightsError, match=rf"avg_down={not avg_down} asks for the {LABEL[not avg_down]} shortcut"):
        pretrained_contnet("contnet_ti", avg_down=not avg_down, **source)
    assert all(count <= 1 for count in file_server.requests.values())  # the download happened once, then the cache


@pytest.mark.parametrize("avg_down", [False, True], ids=["strided", "avg_down"])
def test_a_model_of_the_other_network_refuses_the_checkpoint(
    ti_networks: dict[bool, SavedNetwork], avg_down: bool
) -> None:
    """validated_state_dict (the check every loader runs) names the file's network and the fix."""
    saved = ti_networks[avg_down]
    agreeing = pretrained_contnet("contnet_ti", saved.path, avg_down=avg_down)
    assert agreeing.config.avg_down is avg_down
    other = create_contnet("contnet_ti", avg_down=not avg_down)
    with pytest.raises(WeightsError, match=rf"holds the {LABEL[avg_down]} ConTNet.*avg_down={avg_down}") as raised:
        validated_state_dict(other, torch.load(saved.path, weights_only=True), saved.path)
    assert str(saved.path) in str(raised.value)


def test_cli_list_shows_the_shortcut_of_each_file(
    ti_networks: dict[bool, SavedNetwork],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def listed() -> dict[str, str]:
        assert main(["weights", "list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {line.split()[0]: line for line in lines if line.startswith("contnet_")}

    defaults = listed()
    assert "missing" in defaults["contnet_b"]
    assert "avg-down (default)" in defaults["contnet_b"]
    for name in ("contnet_ti", "contnet_s", "contnet_m"):
        assert "strided (default)" in defaults[name]
    assert main(["weights", "import", "contnet_ti", str(ti_networks[True].path)]) == 0
    capsys.readouterr()  # the import's own message also starts with the variant's name
    cached = listed()["contnet_ti"]
    assert " cached " in cached
    assert "avg-down (downsample.conv.conv)" in cached
    monkeypatch.setenv("ANOMALIB_CONTNET_WEIGHTS", str(ti_networks[False].path.parent))
    found = listed()["contnet_ti"]
    assert " found " in found
    assert "strided (downsample.conv)" in found
    assert str(ti_networks[False].path) in found


@pytest.mark.parametrize("avg_down", [False, True], ids=["strided", "avg_down"])
def test_contnet_b_default_download_runs_the_network_it_was_saved_from(
    avg_down: bool, isolated_environment: Path, monkeypatch: pytest.MonkeyPatch, file_server: FileServer
) -> None:
    """Full ConTNet-B of each network, checked against ConT-B.tsv / ConT-B_avgdown.tsv, served as the default URL.

    The headless build is what ConTNetPaDiM() constructs; the avg-down case is
    the published contnet_b.pth as the SPEC's evidence describes it.
    """
    torch.manual_seed(11)
    source = create_contnet("contnet_b", avg_down=avg_down).eval()
    state = source.state_dict()
    assert state_rows(state) == key_file("ConT-B_avgdown.tsv" if avg_down else "ConT-B.tsv")
    path = isolated_environment.parent / "served.pth"
    torch.save(CHECKPOINT_FORMS["authors_ddp_training"](state), path)
    expected = outputs(source)
    del source, state
    url = file_server.add("/w_contnet/contnet_b.pth", path.read_bytes())
    path.unlink()
    monkeypatch.setitem(PUBLISHED_WEIGHTS, "contnet_b", PublishedWeights("contnet_b", "contnet_b.pth", url))
    monkeypatch.delenv("ANOMALIB_CONTNET_OFFLINE")

    model = pretrained_contnet("contnet_b", num_classes=0).eval()
    assert model.config.avg_down is avg_down
    assert_same_outputs(outputs(model), expected)
    with pytest.raises(WeightsError, match=rf"avg_down={not avg_down} asks for the {LABEL[not avg_down]} shortcut"):
        pretrained_contnet("contnet_b", avg_down=not avg_down, num_classes=0)
    assert file_server.requests["/w_contnet/contnet_b.pth"] == 1
