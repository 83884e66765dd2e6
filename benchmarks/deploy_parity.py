"""Deployed equals fitted? Exports of ConTNetPaDiM and anomalib's Padim against ``Engine.predict``, on image files.

Fits three models through anomalib's ``Engine`` on a 1024 px texture category
(``anomalib_contnet.data.prepare_textures``; random backbone weights, which is all
a parity check needs):

- ``ConTNetPaDiM``: contnet_ti with its own pre-processor (one antialiased resize everywhere);
- ``ConTNetPaDiM, stock pre-processor``: the same model with anomalib's ``PreProcessor``
  (``Resize(antialias=True)``, which anomalib's exports run without antialiasing);
- ``Padim``: anomalib's own, resnet18, its default pre-processor.

Each is exported to ONNX, OpenVINO (FP32, converted from that ONNX file as anomalib's
``to_openvino`` does) and torch, then every file of a set of normal and defective
images (1024x1024, 700x900 and 256x256, each as PNG and as JPEG quality 90) is
predicted by ``OpenVINOInferencer`` (f32 hint), ONNX Runtime (the ``.onnx`` run
directly, on the image decoded by anomalib's ``read_image`` like the inferencers do)
and ``TorchInferencer``, and compared with ``Engine.predict`` on the same folder:
largest |difference| of the normalised score, largest map difference relative to
the largest reference map value, and labels that differ.

Run (about 25 minutes on 2 busy cores)::

    export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 ANOMALIB_CONTNET_OFFLINE=1
    python benchmarks/deploy_parity.py --work /tmp/deploy_parity
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import openvino as ov
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine
from anomalib.models import Padim
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from PIL import Image
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_contnet import ConTNetPaDiM
from anomalib_contnet.data import prepare_textures
from anomalib_contnet.data.textures import load_texture, render_defective, render_normal, texture_bands
from anomalib_contnet.deploy import export_model

CATEGORY = "brick"
FILE_SIZES = ((1024, 1024), (700, 900), (256, 256))
RUNTIMES = ("OpenVINOInferencer", "ONNX Runtime", "TorchInferencer")
Prediction = dict[str, np.ndarray]


def build_models() -> dict[str, Callable[[], AnomalibModule]]:
    """Model name -> constructor (random backbone weights everywhere)."""

    def stock_contnet() -> ConTNetPaDiM:
        own = ConTNetPaDiM(backbone="contnet_ti", pre_trained=False).pre_processor
        stock = PreProcessor(
            Compose([Resize(own.image_size, antialias=True), Normalize(list(own.mean), list(own.std))])
        )
        return ConTNetPaDiM(backbone="contnet_ti", pre_trained=False, pre_processor=stock)

    return {
        "ConTNetPaDiM": lambda: ConTNetPaDiM(backbone="contnet_ti", pre_trained=False),
        "ConTNetPaDiM, stock pre-processor": stock_contnet,
        "Padim (resnet18)": lambda: Padim(backbone="resnet18", pre_trained=False),
    }


def write_files(folder: Path) -> list[Path]:
    """A normal and a defective brick image of each size, each as PNG and as JPEG (quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    band = texture_bands(load_texture(CATEGORY))["test"]
    paths = []
    for height, width in FILE_SIZES:
        side = max(height, width)
        for index in range(2):
            normal = render_normal(band, 1, CATEGORY, "test/good", index, crop_size=160, image_size=side)
            _, defective, _ = render_defective(band, 1, CATEGORY, index, "stain", crop_size=160, image_size=side)
            for kind, pixels in (("good", normal), ("stain", defective)):
                image = Image.fromarray(pixels[:height, :width])
                for suffix in ("png", "jpg"):
                    path = folder / f"{height}x{width}_{kind}{index}.{suffix}"
                    image.save(path, quality=90)
                    paths.append(path)
    return paths


def fields(prediction: object) -> Prediction:
    """Normalised score, label and anomaly map of a one-image prediction."""
    return {
        "pred_score": np.asarray(prediction.pred_score, dtype=np.float64).reshape(()),
        "pred_label": np.asarray(prediction.pred_label).reshape(()).astype(int),
        "anomaly_map": np.asarray(prediction.anomaly_map, dtype=np.float64).squeeze(),
    }


def predict_everywhere(model: AnomalibModule, engine: Engine, files: list[Path], work: Path) -> dict[str, dict]:
    """Predictions of Engine.predict and of the three deployments, per runtime and file name."""
    batches = engine.predict(model=model, data_path=files[0].parent)
    results = {"Engine.predict": {Path(batch.image_path[0]).name: fields(batch) for batch in batches}}
    onnx_path = export_model(model, "onnx", work / "exports", engine=engine)
    xml = work / "openvino" / "model.xml"
    ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
    torch_path = export_model(model, "torch", work / "exports", engine=engine)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    os.environ["TRUST_REMOTE_CODE"] = "1"
    openvino = OpenVINOInferencer(xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    torch_inferencer = TorchInferencer(torch_path, device="cpu")
    for runtime in RUNTIMES:
        results[runtime] = {}
    for path in files:
        results["OpenVINOInferencer"][path.name] = fields(openvino.predict(path))
        image = read_image(path, as_tensor=True)[None].numpy()
        outputs = dict(zip(names, session.run(None, {"input": image}), strict=True))
        results["ONNX Runtime"][path.name] = fields(type("Outputs", (), outputs))
        results["TorchInferencer"][path.name] = fields(torch_inferencer.predict(path))
    return results


def compare(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per runtime: max |score difference|, max relative map difference, label flips, against Engine.predict."""
    reference = results["Engine.predict"]
    table = {}
    for runtime in RUNTIMES:
        score, relative_map, flips = 0.0, 0.0, 0
        for name, expected in reference.items():
            actual = results[runtime][name]
            score = max(score, abs(float(actual["pred_score"] - expected["pred_score"])))
            difference = np.abs(actual["anomaly_map"] - expected["anomaly_map"]).max()
            relative_map = max(relative_map, float(difference / np.abs(expected["anomaly_map"]).max()))
            flips += int(actual["pred_label"] != expected["pred_label"])
        table[runtime] = {"max |score diff|": score, "max relative map diff": relative_map, "label flips": flips}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data, exports and results")
    parser.add_argument("--n-train", type=int, default=20, help="normal training images")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = arguments.work / "textures"
    prepare_textures(
        root, categories=(CATEGORY,), image_size=1024, n_train=arguments.n_train, n_test_good=6, n_test_defect=6
    )
    files = write_files(arguments.work / "files")
    rows = {}
    for name, build in build_models().items():
        work = arguments.work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        datamodule = MVTecAD(root=root, category=CATEGORY, train_batch_size=8, eval_batch_size=8, num_workers=0)
        model = build()
        engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False)
        engine.fit(model=model, datamodule=datamodule)
        rows[name] = compare(predict_everywhere(model, engine, files, work))
        print(name, json.dumps(rows[name]), flush=True)
    (arguments.work / "deploy_parity.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{len(files)} files; differences from Engine.predict on the same files\n")
    print("| model | runtime | max abs score diff | max relative map diff | label flips |")
    print("|---|---|---|---|---|")
    for name, table in rows.items():
        for runtime, row in table.items():
            print(
                f"| {name} | {runtime} | {row['max |score diff|']:.1e} | {row['max relative map diff']:.1e} "
                f"| {row['label flips']} / {len(files)} |"
            )


if __name__ == "__main__":
    main()
