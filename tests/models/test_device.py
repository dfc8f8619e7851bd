"""Devices and compute precision: clear errors, results on the CPU, documented tolerances."""

import numpy as np
import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.cli import main
from clip_interpret.device import available_devices, check_precision, out_of_memory_error, resolve_device
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images

from tests.helpers import make_open_clip

# total() against the float32 native embedding, relative (docs/decomposition.md)
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


def test_device_names_resolve_and_missing_gpus_are_named():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    there = len(available_devices()) - 1
    with pytest.raises(ClipInterpretError, match=r"device 'cuda:7' is not available.*devices here: cpu"):
        resolve_device(f"cuda:{max(7, there)}")
    with pytest.raises(ClipInterpretError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ClipInterpretError, match="bad device"):
        resolve_device("cuda:x")
    with pytest.raises(ClipInterpretError, match="unknown compute precision 'int8'"):
        check_precision("int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_fails_before_loading_in_one_line(capsys):
    assert main(["decompose", "--model", "open_clip:ViT-H-14", "x.png", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no usable GPU" in err and "devices here: cpu" in err
    with pytest.raises(ClipInterpretError, match="no usable GPU"):
        load_model("open_clip:test-vit-tiny", device="cuda")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_total_matches_the_fp32_native_embedding_within_tolerance(precision):
    native_model = make_open_clip("ViT-B-16", seed=3)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = native_model.encode_image(pixels)
    native = native / native.norm(dim=-1, keepdim=True)
    model = load_model(native_model, device="cpu", precision=precision)
    d = decompose(model, pixels)
    assert d.precision == precision and d.embedding.dtype == torch.float32
    assert all(t.device.type == "cpu" for t in (d.heads, d.mlps, d.embedding))
    error = ((d.total() - native).norm(dim=-1) / native.norm(dim=-1)).max().item()
    assert error <= TOLERANCE[precision]
    if precision != "fp32":
        assert error > 1e-6  # the lower precision really was used
        assert ((d.total() - d.embedding).abs().max()) < 1e-5  # the pieces still sum to what was computed


def test_lower_precision_text_and_image_encoders_stay_close():
    model = load_model(make_open_clip("test-vit-tiny"), device="cpu")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["a red circle", "two blue squares"]
    reference = model.encode_image(pixels), model.encode_text(texts)
    model.to(precision="bf16")
    try:
        image, text = model.encode_image(pixels), model.encode_text(texts)
    finally:
        model.to(precision="fp32")
    assert image.dtype == text.dtype == torch.float32 and image.device.type == "cpu"
    assert (image - reference[0]).abs().max() < 2e-2 and (text - reference[1]).abs().max() < 2e-2
    assert not torch.equal(image, reference[0])


def test_run_records_its_compute_precision_and_refuses_another(tmp_path):
    model = load_model("open_clip:test-vit-tiny", device="cpu")
    run = index_images(model, "toyworld:20:1", tmp_path / "run", progress=False, precision="bf16")
    assert run.manifest["precision"] == "bf16" and run.manifest["dtype"] == "fp16"
    exact = index_images(model, "toyworld:20:1", tmp_path / "exact", progress=False)
    assert np.abs(run.embeddings() - exact.embeddings()).max() < 2e-2
    with pytest.raises(ClipInterpretError, match="compute precision 'bf16' vs 'fp32'"):
        index_images(model, "toyworld:20:1", tmp_path / "run", progress=False)


def test_out_of_memory_says_what_to_try(monkeypatch, tmp_path):
    model = load_model("open_clip:test-vit-tiny", device="cpu")

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    import importlib

    monkeypatch.setattr(importlib.import_module("clip_interpret.decompose"), "decompose_pixels", full)
    with pytest.raises(ClipInterpretError, match="out of memory on cpu .*batch size 8.*--batch-size 4"):
        decompose(model, torch.zeros(8, 3, 32, 32), batch_size=8, spatial=True)
    monkeypatch.setattr("clip_interpret.runstore.build.decompose_pixels", full)
    with pytest.raises(ClipInterpretError, match="while indexing at batch size 16"):
        index_images(model, "toyworld:20:1", tmp_path / "run", batch_size=16, progress=False, workers=0)
    message = str(out_of_memory_error(torch.device("cpu"), 1, per_image_bytes=2**20))
    assert "--batch-size 1" in message


def test_every_model_command_takes_device_and_precision():
    from clip_interpret.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    loading = ["decompose", "index", "ablate", "textspan", "label", "faithfulness", "report", "analyze", "demo",
               "property-nn", "segment", "contrast", "image-nn", "text-nn", "app"]
    for name in loading:
        options = {o for a in subparsers[name]._actions for o in a.option_strings}
        assert {"--device", "--precision"} <= options, name
    for name in ("index", "analyze", "demo", "decompose"):
        options = {o for a in subparsers[name]._actions for o in a.option_strings}
        assert {"--workers", "--decode", "--draft"} <= options, name
