"""Your own data: COCO-format and Pascal VOC folders with names COCO does not have load, train,
save, resume and score per class by those names; bad files get errors that name the fix."""

import contextlib
import json
import shutil

import pytest
import torch

import frcnn_common as fc
from detectors import OracleDetector
NAMES = ["__background__", "block", "wedge", "disc"]  # the COCO file's categories in id order 3, 7, 10


def coco_data(folder, **options):
    with pytest.warns(UserWarning, match="1 boxes of zero width or height dropped"):
        return fc.CocoFormatDataset(str(folder / "images"), str(folder / "train.json"),
                                    resize=None, **options)


def test_coco_format_samples_are_the_drawn_objects(own_coco_folder, own_kit):
    data = coco_data(own_coco_folder)
    assert data.class_names == NAMES and data.num_classes == 4 and data.dropped_boxes == 1
    assert len(data) == 7  # the image without objects is kept for evaluation
    for (image, target), (pixels, boxes, labels) in zip(data, own_kit.scenes()):
        drawn = len(boxes)  # image 5 also has a crowd box, after the drawn ones
        torch.testing.assert_close(target["boxes"][:drawn], boxes)
        assert [data.class_names[i] for i in target["labels"][:drawn]] == [own_kit.NAMES[i] for i in labels.tolist()]
        shown = (fc.unnormalize(image) * 255).permute(2, 0, 1)  # the sample's own pixels
        torch.testing.assert_close(shown, pixels.float(), atol=1.0, rtol=0)
        background = shown[:, 0, 0]  # texture 0: a flat background (and grain)
        for x1, y1, x2, y2 in target["boxes"][:drawn].round().long().tolist():
            centre = shown[:, (y1 + y2) // 2, (x1 + x2) // 2]
            outside = shown[:, y1 - 1 if y1 > 0 else y2, x1 - 1 if x1 > 0 else x2]
            assert (centre - background).abs().max() > 60  # an object's colour inside its box
            assert (outside - background).abs().max() < 30 or y1 == 0 or x1 == 0
    _, last = data[5]
    assert last["iscrowd"].tolist() == [0] * (len(last["iscrowd"]) - 1) + [1]  # crowd kept
    assert len(coco_data(own_coco_folder, train=True)) == 6  # training skips the empty image


def test_voc_folder_reads_split_names_and_difficult(own_voc_folder, own_kit):
    data = fc.VOCFormatDataset(str(own_voc_folder), resize=None)
    assert data.class_names == ["__background__", "block", "disc", "wedge"] and len(data) == 5
    for (_, target), (_, boxes, labels) in zip(data, own_kit.scenes()):
        torch.testing.assert_close(target["boxes"], boxes)
        assert [data.class_names[i] for i in target["labels"]] == [own_kit.NAMES[i] for i in labels.tolist()]
    assert data[0][1]["iscrowd"].tolist()[0] == 1 and data[1][1]["iscrowd"].sum() == 0
    named = fc.VOCFormatDataset(str(own_voc_folder), class_names=NAMES, resize=None)
    assert named.num_classes == 4
    for (_, mine), (_, found) in zip(named, data):
        assert [NAMES[i] for i in mine["labels"]] == [data.class_names[i] for i in found["labels"]]
    with pytest.raises(ValueError, match="'disc' is not among class_names"):
        fc.VOCFormatDataset(str(own_voc_folder), class_names=["__background__", "block", "wedge"])
    with pytest.raises(FileNotFoundError, match="split 'val' is not in this VOC folder"):
        fc.VOCFormatDataset(str(own_voc_folder), "val")


@pytest.mark.parametrize("kind", ["coco", "voc"])
def test_own_data_trains_saves_resumes_and_scores_per_class(kind, own_coco_folder, own_voc_folder,
                                                            tmp_path, cpu):
    """Six images and four steps teach a detector nothing, so the per-class scores are checked on
    a stand-in that finds every disc and nothing else: AP50 1 for the discs, 0 for the others."""
    folder = own_coco_folder if kind == "coco" else own_voc_folder
    with pytest.warns(UserWarning) if kind == "coco" else contextlib.nullcontext():
        train = fc.folder_dataset(str(folder), train=True, resize=None)
        held_out = fc.folder_dataset(str(folder), resize=None)
    torch.manual_seed(0)
    model = fc.tiny_detector(train.num_classes)
    path = str(tmp_path / "own.pt")
    loader = fc.make_loader(train, 2, seed=0)
    run = dict(lr=0.01, steps_per_epoch=2, checkpoint_path=path, device=cpu, amp=False, progress=False)
    fc.fit(model, loader, 1, **run)
    history = fc.fit(model, loader, 2, **run)  # resumes from the checkpoint: epoch 2 only
    assert len(history["total"]) == 4 and all(torch.isfinite(torch.tensor(history["total"])))
    again = fc.tiny_detector(train.num_classes)
    fc.load_checkpoint(path, again)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    loader = fc.make_loader(held_out, 4, shuffle=False)
    metrics = fc.evaluate(again, loader, progress=False)
    present = {held_out.class_names[int(i)] for _, t in held_out for i in t["labels"]}
    assert present == {"disc", "block", "wedge"}
    assert {k for k in metrics if k.startswith("AP/")} == {f"AP/{n}" for n in present}
    discs = OracleDetector(held_out, labels=[held_out.class_names.index("disc")])
    found = fc.evaluate(discs, loader, progress=False)
    assert {n: found[f"AP50/{n}"] for n in present} == {"disc": 1.0, "block": 0.0, "wedge": 0.0}


def test_finetuning_transfers_all_but_the_new_predictor(own_coco_folder, tmp_path):
    shapes = fc.tiny_detector(len(fc.SHAPE_NAMES))
    path = str(tmp_path / "shapes.pt")
    fc.save_checkpoint(path, shapes)
    mine = fc.tiny_detector(coco_data(own_coco_folder).num_classes + 1)  # 5 classes: a new head
    left = fc.transfer_weights(mine, path)
    assert left and all(k.startswith("roi_heads.predictor.") for k in left)
    assert torch.equal(mine.state_dict()["rpn.head.conv.weight"], shapes.state_dict()["rpn.head.conv.weight"])


def _broken_copy(folder, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    data = json.loads((copy / "train.json").read_text())
    text = edit(data, copy)
    (copy / "train.json").write_text(text if isinstance(text, str) else json.dumps(data))
    return copy


def _drop_image(data, copy):
    (copy / "images" / "2.png").unlink()


def _bad_category(data, copy):
    data["annotations"][0]["category_id"] = 99


def _outside(data, copy):
    data["annotations"][1]["bbox"] = [50, 50, 30, 30]


@pytest.mark.parametrize("edit, error, message", [
    (_drop_image, FileNotFoundError, r"train.json: image 102 is file_name '2.png'.*Pass the folder"),
    (_bad_category, ValueError, r"train.json: annotation 1 has category_id 99.*Add that category"),
    (_outside, ValueError, r"train.json: annotation 2 has bbox .*outside its image.*fix the box"),
    (lambda data, copy: "", ValueError, r"train.json: the file is empty. Export"),
    (lambda data, copy: json.dumps([1, 2]), ValueError, r"train.json: not in COCO's format.*images"),
    (lambda data, copy: "{nope", ValueError, r"train.json: not valid JSON"),
])
def test_bad_coco_files_name_the_file_record_and_fix(own_coco_folder, tmp_path, edit, error, message):
    copy = _broken_copy(own_coco_folder, tmp_path, edit)
    with pytest.raises(error, match=message):
        fc.CocoFormatDataset(str(copy / "images"), str(copy / "train.json"))


def test_train_py_finetunes_a_checkpoint_on_a_folder(own_voc_folder, tmp_path, capsys):
    import train

    shapes = str(tmp_path / "shapes.pt")
    fc.save_checkpoint(shapes, fc.tiny_detector(6))  # 5 classes: the folder has 3
    mine = str(tmp_path / "mine.pt")
    train.main(["--data", str(own_voc_folder), "--image-size", "64", "--finetune", shapes,
                "--steps-per-epoch", "1", "--batch-size", "2", "--no-amp", "--checkpoint", mine])
    assert "loaded all weights but ['roi_heads.predictor." in capsys.readouterr().out
    fc.load_checkpoint(mine, fc.tiny_detector(4))  # num_classes from the folder: 3 names + 1


def _voc_copy(folder, tmp_path, old, new, image=None):
    copy = tmp_path / "voc"
    shutil.copytree(folder, copy)
    xml = copy / "Annotations" / "img1.xml"
    xml.write_text(xml.read_text().replace(old, new, 1))
    if image:
        (copy / "JPEGImages" / image).unlink()
    return copy


def test_bad_voc_files_name_the_file_object_and_fix(own_voc_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"img1.xml: its image .*img1.png does not exist"):
        fc.VOCFormatDataset(str(_voc_copy(own_voc_folder, tmp_path, "", "", "img1.png")))
    shutil.rmtree(tmp_path / "voc")
    with pytest.raises(ValueError, match=r"img1.xml: object 0 .* outside its 64 x 64 px image"):
        fc.VOCFormatDataset(str(_voc_copy(own_voc_folder, tmp_path, "<xmax>", "<xmax>9")))


def test_write_shapes_coco_folder_merges_shapes_into_the_named_classes(tmp_path):
    names_of = {1: "disc", 2: "polygon", 3: "polygon"}
    path = fc.write_shapes_coco_folder(str(tmp_path / "own"), 6, names_of, image_size=96, seed=3)
    data = fc.CocoFormatDataset(str(tmp_path / "own" / "images"), path, min_size=96)
    assert data.class_names == ["__background__", "disc", "polygon"] and len(data) == 6
    shapes = fc.SyntheticShapesDataset(6, 96, seed=3)
    for i in range(6):
        _, boxes, labels = shapes.render(i)
        target = data[i][1]
        torch.testing.assert_close(target["boxes"], boxes.float())
        assert target["labels"].tolist() == [1 if int(l) == 1 else 2 for l in labels]
