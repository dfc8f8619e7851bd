"""The zero-shot segmentation benchmark: its scores against a transcription of the published
protocol, the ImageNet-Segmentation file format, and the toy world end to end."""

import json
import pickle

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from clip_interpret.cli import main
from clip_interpret.errors import ClipInterpretError
from clip_interpret.segbench import PUBLISHED, ImagenetSegmentation, Tally, average_precision, open_dataset


def test_average_precision_matches_scikit_learn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((6, 300)), 1)  # many ties
    scores[5] = 0.5  # all tied
    targets = rng.random((6, 300)) < np.linspace(0.05, 0.9, 6)[:, None]
    ours = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    want = [average_precision_score(t, s) for t, s in zip(targets, scores)]
    assert ours.numpy() == pytest.approx(want, abs=1e-12)


def _published_image(heatmap: torch.Tensor, labels: torch.Tensor):
    """The published script's steps for one image, transcribed: (correct, labelled, inter, union, ap)."""
    res = heatmap[None, None].float()
    res = torch.clip(res, 0, res.max())
    res = (res - res.min()) / (res.max() - res.min())
    ret = res.mean()
    res_1, res_0 = res.gt(ret).type(res.type()), res.le(ret).type(res.type())
    res_1_ap, res_0_ap = res, 1 - res
    for t in (res_1, res_0, res_1_ap, res_0_ap):
        t[t != t] = 0
    output, output_ap = torch.cat((res_0, res_1), 1), torch.cat((res_0_ap, res_1_ap), 1)
    _, predict = torch.max(output[0], 0)
    predict, target = predict.numpy() + 1, labels.numpy() + 1
    correct, labelled = np.sum((predict == target) * (target > 0)), np.sum(target > 0)
    predict = predict * (target > 0).astype(predict.dtype)
    intersection = predict * (predict == target)
    inter, _ = np.histogram(intersection, bins=2, range=(1, 2))
    area_pred, _ = np.histogram(predict, bins=2, range=(1, 2))
    area_lab, _ = np.histogram(target, bins=2, range=(1, 2))
    onehot = torch.zeros((2, *labels.shape)).scatter_(0, labels[None].long(), 1)
    ap = np.nan_to_num(average_precision_score(onehot.numpy().reshape(-1), output_ap[0].numpy().reshape(-1)))
    return correct, labelled, inter, area_pred + area_lab - inter, ap


def test_scores_follow_the_published_protocol():
    rng = np.random.default_rng(1)
    n, size = 7, (24, 20)
    maps = torch.from_numpy(rng.normal(size=(n, 1, *size)).astype(np.float32))
    maps[3] = 0.25  # a constant map: all background
    maps[4] = -torch.rand(size)  # all negative: clipped to a constant
    truth = torch.from_numpy(rng.random((n, 1, *size)) < 0.3)
    truth[5] = False  # an image without foreground
    tally = Tally(1)
    tally.add(maps, truth)
    got = tally.result()[0]
    parts = [_published_image(maps[i, 0], truth[i, 0].long()) for i in range(n)]
    correct, labelled = sum(p[0] for p in parts), sum(p[1] for p in parts)
    inter, union = sum(p[2] for p in parts), sum(p[3] for p in parts)
    eps = np.spacing(1, dtype=np.float64)
    assert got["pixel_accuracy"] == pytest.approx(100 * correct / (eps + labelled), abs=1e-9)
    assert got["miou"] == pytest.approx(100 * (inter / (eps + union)).mean(), abs=1e-9)
    assert got["map"] == pytest.approx(100 * np.mean([p[4] for p in parts]), abs=1e-6)


def _write_mat(path, images, masks):
    """A file shaped like gtsegs_ijcv.mat (MATLAB v7.3): /value/img and /value/gt hold [N, 1]
    object references; an image is stored [3, W, H], a mask [W, H] inside a 1x1 cell."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        img_refs = value.create_dataset("img", (len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = value.create_dataset("gt", (len(images), 1), dtype=h5py.ref_dtype)
        for i, (image, mask) in enumerate(zip(images, masks)):
            img_refs[i, 0] = refs.create_dataset(f"i{i}", data=image.transpose(2, 1, 0)).ref
            inner = refs.create_dataset(f"m{i}", data=mask.T.astype(np.uint8)).ref
            cell = refs.create_dataset(f"c{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = inner
            gt_refs[i, 0] = cell.ref
    with open(path, "r+b") as handle:  # MATLAB's text header in the user block
        handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")


@pytest.fixture
def mat_file(tmp_path):
    rng = np.random.default_rng(2)
    sizes = [(50, 70), (64, 64), (80, 40)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    masks = [np.zeros((h, w), bool) for h, w in sizes]
    for mask in masks:
        h, w = mask.shape
        mask[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = True
    path = tmp_path / "gtsegs_ijcv.mat"
    _write_mat(path, images, masks)
    return path, images, masks


def test_the_imagenet_segmentation_file_is_read_exactly(mat_file, tmp_path):
    path, images, masks = mat_file
    data = ImagenetSegmentation(str(path))
    assert len(data) == 3 and len(ImagenetSegmentation(str(path), limit=2)) == 2
    for i in range(3):
        assert np.array_equal(np.asarray(data.load(i)), images[i])  # [H, W, 3], as written
        assert np.array_equal(data.targets(i)[0], masks[i])
    clone = pickle.loads(pickle.dumps(data))  # the workers get their own handle
    assert np.array_equal(clone.targets(2)[0], masks[2])
    with pytest.raises(ClipInterpretError, match="not found"):
        open_dataset(f"imagenet-seg:{tmp_path / 'missing.mat'}")
    (tmp_path / "v5.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(ClipInterpretError, match="not a MATLAB v7.3"):
        open_dataset(f"imagenet-seg:{tmp_path / 'v5.mat'}")
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(ClipInterpretError, match="/value/img"):
        open_dataset(f"imagenet-seg:{tmp_path / 'other.mat'}")
    with pytest.raises(ClipInterpretError, match="toyworld:N"):
        open_dataset("voc:/data")


def test_segbench_on_the_imagenet_segmentation_format(mat_file, tmp_path, capsys):
    path, _, _ = mat_file
    classifier = tmp_path / "classifier.npy"
    np.save(classifier, np.random.default_rng(3).normal(size=(128, 5)).astype(np.float32))  # [D, C] as published
    out = tmp_path / "out"
    args = ["segbench", "--model", "toy", "--dataset", f"imagenet-seg:{path}", "--classifier", str(classifier),
            "--out", str(out), "--workers", "0"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "published" in text and "75.21" in text and "54.50" in text and "81.61" in text
    assert "ViT-H-14" in text and "chance" in text
    result = json.loads(next(out.glob("segbench-*.json")).read_text())
    assert result["n_images"] == 3 and list(result["tasks"]) == ["imagenet"]
    scores = result["tasks"]["imagenet"]["scores"]
    assert 0 <= scores["miou"] <= 100 and 0 <= scores["map"] <= 100
    assert result["published"] == PUBLISHED
    np.save(classifier, np.zeros((3, 7), np.float32))
    assert main(args) == 2
    assert "expected [classes, 128]" in capsys.readouterr().err


def test_maps_are_the_decomposition_s_per_patch_shares(toy_model):
    """The total map is the similarity map of the predicted class's text direction over all heads
    (computed through Decomposition.similarity_maps), and it is the sum of the per-head maps."""
    from clip_interpret.decompose import decompose
    from clip_interpret.segbench import _SegMaps
    from clip_interpret.toyworld import ToyWorld
    from clip_interpret.toyworld.evaluate import class_embeddings

    image = ToyWorld(1, seed=1)[0].image
    classes = class_embeddings(toy_model, "color").float()
    pixels = toy_model.preprocess.normalise(toy_model.preprocess.crop_uint8(image)[None])
    out = _SegMaps(toy_model.vit, list(range(6)), "fp32", [classes], per_head=True)(pixels)
    maps = out["maps"][0, 0]  # [1 + 48, 8, 8]
    d = decompose(toy_model, [image], layers="all", spatial=True)
    pick = int((d.embedding @ classes.T).argmax())
    assert int(out["chosen"][0, 0]) == pick
    direction = classes[pick] - classes.mean(dim=0)
    want = d.similarity_maps(direction[None], upsample=False)[0, 0]
    assert torch.allclose(maps[0], want, atol=1e-5)
    assert torch.allclose(maps[0], maps[1:].sum(dim=0), atol=1e-5)


def test_segbench_on_the_toy_world(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segbench", "--model", "toy", "--dataset", "toyworld:40:1", "--out", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "heads that localise the objects best" in text and "chance" in text
    result = json.loads(next(out.glob("segbench-*.json")).read_text())
    assert list(result["tasks"]) == ["shape", "color", "size", "count", "position", "background", "pattern"]
    assert result["tasks"]["pattern"]["ground_truth"] == "background"
    assert len(result["tasks"]["color"]["heads"]) == 48 and len(result["heads_objects"]) == 48
    # the maps know where this image's objects are: better than the same maps on another image's objects
    assert result["objects"]["miou"] > result["objects_chance"]["miou"]
    assert main(["segbench", "--model", "toy", "--dataset", "toyworld:4:1", "--classifier", "x.npy",
                 "--out", str(out)]) == 2
    assert "--classifier is for imagenet-seg" in capsys.readouterr().err
    assert main(["segbench", "--model", "toy", "--dataset", "coco:/x", "--out", str(out)]) == 2


def test_maps_of_an_attention_pooled_tower_cover_every_patch(map_model):
    """A tower without a CLS token (SigLIP's layout): every token is a patch, none is dropped."""
    from clip_interpret.decompose import decompose
    from clip_interpret.segbench import _SegMaps

    vit = map_model.vit
    pixels = torch.randn(2, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(3))
    classes = torch.nn.functional.normalize(torch.randn(3, vit.cfg.output_dim, generator=torch.Generator()
                                                        .manual_seed(4)), dim=-1)
    out = _SegMaps(vit, list(range(vit.cfg.layers)), "fp32", [classes], per_head=False)(pixels)
    d = decompose(map_model, pixels, layers="all", spatial=True)
    for b in range(2):
        pick = int((d.embedding[b] @ classes.T).argmax())
        want = d.similarity_maps((classes[pick] - classes.mean(dim=0))[None], upsample=False)[b, 0]
        assert torch.allclose(out["maps"][b, 0, 0], want, atol=1e-5)
