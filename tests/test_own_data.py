"""Your own data: COCO-format and Pascal VOC folders with names COCO does not have load, train,
save, resume and score per class by those names; the export folders of CVAT, Label Studio,
Roboflow, LabelImg and makesense.ai load as unzipped; photos keep their EXIF orientation; bad
files and odd field values get errors that name the file, the record and the fix."""

import contextlib
import json
import shutil
import warnings

import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

import frcnn_common as fc
import frcnn_engine as engine
import frcnn_course as course
from conftest import OWN_NAMES, TOOL_EXPORTS, TOOL_NAMES, own_scenes, tool_objects
from detectors import OracleDetector

CPU = torch.device("cpu")
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
        shown = (course.unnormalize(image) * 255).permute(2, 0, 1)  # the sample's own pixels
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
    with pytest.raises(FileNotFoundError, match=r"split 'val' is not in the VOC folder .*\['train'\]"):
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
    loader = engine.make_loader(train, 2, seed=0)
    run = dict(lr=0.01, steps_per_epoch=2, checkpoint_path=path, device=cpu, amp=False, progress=False)
    engine.fit(model, loader, 1, **run)
    history = engine.fit(model, loader, 2, **run)  # resumes from the checkpoint: epoch 2 only
    assert len(history["total"]) == 4 and all(torch.isfinite(torch.tensor(history["total"])))
    again = fc.tiny_detector(train.num_classes)
    engine.load_checkpoint(path, again)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    loader = engine.make_loader(held_out, 4, shuffle=False)
    metrics = engine.evaluate(again, loader, progress=False)
    present = {held_out.class_names[int(i)] for _, t in held_out for i in t["labels"]}
    assert present == {"disc", "block", "wedge"}
    assert {k for k in metrics if k.startswith("AP/")} == {f"AP/{n}" for n in present}
    discs = OracleDetector(held_out, labels=[held_out.class_names.index("disc")])
    found = engine.evaluate(discs, loader, progress=False)
    assert {n: found[f"AP50/{n}"] for n in present} == {"disc": 1.0, "block": 0.0, "wedge": 0.0}


def test_finetuning_transfers_all_but_the_new_predictor(own_coco_folder, tmp_path):
    shapes = fc.tiny_detector(len(fc.SHAPE_NAMES))
    path = str(tmp_path / "shapes.pt")
    engine.save_checkpoint(path, shapes)
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
    (_drop_image, FileNotFoundError, r"train.json: image 102 is file_name '2.png', but no such image.*Pass the folder"),
    (_bad_category, ValueError, r"train.json: annotation 1: has category_id 99.*Add that category"),
    (_outside, ValueError, r"train.json: annotation 2: bbox .* lies outside its 64 x 64 px image by 16 px. Fix the box"),
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
    engine.save_checkpoint(shapes, fc.tiny_detector(6))  # 5 classes: the folder has 3
    mine = str(tmp_path / "mine.pt")
    train.main(["--data", str(own_voc_folder), "--image-size", "64", "--finetune", shapes,
                "--steps-per-epoch", "1", "--batch-size", "2", "--no-amp", "--checkpoint", mine])
    assert "loaded all weights but ['roi_heads.predictor." in capsys.readouterr().out
    engine.load_checkpoint(mine, fc.tiny_detector(4))  # num_classes from the folder: 3 names + 1


def _voc_copy(folder, tmp_path, old, new, image=None, count=1):
    copy = tmp_path / "voc"
    shutil.copytree(folder, copy)
    xml = copy / "Annotations" / "img1.xml"
    xml.write_text(xml.read_text().replace(old, new, count))
    if image:
        (copy / "JPEGImages" / image).unlink()
    return copy


def test_bad_voc_files_name_the_file_object_and_fix(own_voc_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"img1.xml: its image 'img1.png' is in none of"):
        fc.VOCFormatDataset(str(_voc_copy(own_voc_folder, tmp_path, "", "", "img1.png")))
    shutil.rmtree(tmp_path / "voc")
    with pytest.raises(ValueError, match=r"img1.xml: object 0 \(\w+\): bndbox .* lies outside its 64 x 64 px image"):
        fc.VOCFormatDataset(str(_voc_copy(own_voc_folder, tmp_path, "<xmax>", "<xmax>9")))


def test_write_shapes_coco_folder_merges_shapes_into_the_named_classes(tmp_path):
    names_of = {1: "disc", 2: "polygon", 3: "polygon"}
    path = course.write_shapes_coco_folder(str(tmp_path / "own"), 6, names_of, image_size=96, seed=3)
    data = fc.CocoFormatDataset(str(tmp_path / "own" / "images"), path, min_size=96)
    assert data.class_names == ["__background__", "disc", "polygon"] and len(data) == 6
    shapes = fc.SyntheticShapesDataset(6, 96, seed=3)
    for i in range(6):
        _, boxes, labels = shapes.render(i)
        target = data[i][1]
        torch.testing.assert_close(target["boxes"], boxes.float())
        assert target["labels"].tolist() == [1 if int(l) == 1 else 2 for l in labels]


def test_write_shapes_coco_folder_passes_new_shapes_to_the_renderer(tmp_path):
    kinds = {"shapes": ("ring", "cross"), "object_size": (0.2, 0.5)}
    path = course.write_shapes_coco_folder(str(tmp_path / "new"), 4, {1: "ring", 2: "plus"},
                                       image_size=64, seed=5, **kinds)
    data = fc.CocoFormatDataset(str(tmp_path / "new" / "images"), path, min_size=64)
    assert data.class_names == ["__background__", "plus", "ring"]  # category ids in name order
    shapes = fc.SyntheticShapesDataset(4, 64, seed=5, **kinds)
    for i in range(4):
        _, boxes, labels = shapes.render(i)
        target = data[i][1]
        torch.testing.assert_close(target["boxes"], boxes.float())
        assert target["labels"].tolist() == [2 if int(l) == 1 else 1 for l in labels]


# ─── the tools' export folders (written by conftest.write_tool_export) ──────────────────────────


def _tool_dataset(tool_exports, tool, **options):
    split, _ = TOOL_EXPORTS[tool]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = fc.folder_dataset(tool_exports[tool], split, resize=None, **options)
    return data, [str(w.message) for w in caught]


@pytest.mark.parametrize("tool", list(TOOL_EXPORTS))
def test_each_tool_export_loads_as_unzipped_with_boxes_on_the_drawn_objects(tool, tool_exports,
                                                                             capsys):
    data, said = _tool_dataset(tool_exports, tool)
    assert TOOL_EXPORTS[tool][1] in capsys.readouterr().out == data.layout + "\n"
    assert data.class_names == ["__background__", *TOOL_NAMES] and len(data) == 6
    drawn = torch.stack([pixels.float() for pixels, _, _ in own_scenes()])
    for index, ((image, target), (_, boxes, labels)) in enumerate(zip(data, own_scenes())):
        written, names = tool_objects(tool, boxes, labels)
        torch.testing.assert_close(target["boxes"], torch.tensor(written))  # 0-based corners
        assert [data.class_names[i] for i in target["labels"]] == names
        shown = (course.unnormalize(image) * 255).permute(2, 0, 1)
        assert int((drawn - shown).abs().mean((1, 2, 3)).argmin()) == index  # its own image
    is_roboflow = tool == "roboflow_coco"
    assert any("category 0 'shapes' is not a class" in s for s in said) == is_roboflow


def test_a_folder_of_several_splits_lists_them_and_takes_one_by_name(tool_exports, tmp_path):
    with pytest.raises(ValueError, match=r"holds 2 COCO-format annotation files: \['train', "
                                         r"'valid'\]. Ask for one by name"):
        fc.folder_dataset(tool_exports["roboflow_coco"])
    valid = fc.folder_dataset(tool_exports["roboflow_coco"], "valid", verbose=False)
    assert len(valid) == 2 and valid.class_names == ["__background__", *TOOL_NAMES]
    with pytest.raises(FileNotFoundError, match=r"split 'test' is not in .*\['train', 'valid'\]"):
        fc.folder_dataset(tool_exports["roboflow_coco"], "test")
    with pytest.raises(FileNotFoundError, match=r"split 'train' is not in .*\['default'\]"):
        fc.folder_dataset(tool_exports["cvat_voc"], "train")  # the per-class lists are no splits


def _official(coco_kit, tmp_path):
    """The official COCO layout of the scenes that stay inside their images."""
    return coco_kit.write_coco_layout(str(tmp_path / "coco"), coco_kit.SCENES[:5])


def test_the_official_coco_layout_loads_with_its_categories(coco_kit, tmp_path, capsys):
    data = fc.folder_dataset(_official(coco_kit, tmp_path), resize=None)
    assert "the official COCO layout, annotations/instances_val2017.json, images in val2017/" \
        in capsys.readouterr().out
    assert data.class_names == list(fc.COCO_NAMES) and len(data) == 5
    for (_, target), scene in zip(data, coco_kit.SCENES):
        boxes, labels = coco_kit.expected_objects(scene)
        torch.testing.assert_close(target["boxes"], torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        assert target["labels"].tolist() == labels


@pytest.mark.parametrize("tool", list(TOOL_EXPORTS) + ["coco"])
def test_train_py_trains_on_each_export_and_scores_per_class(tool, tool_exports, coco_kit,
                                                            tmp_path, capsys):
    import train

    folder, (split, line) = ((_official(coco_kit, tmp_path), (None, "the official COCO layout"))
                             if tool == "coco"
                             else (tool_exports[tool], TOOL_EXPORTS[tool]))
    path = str(tmp_path / "mine.pt")
    train.main(["--data", folder, *(["--split", split] if split else []), "--image-size", "64",
                "--steps-per-epoch", "2", "--batch-size", "2", "--no-amp", "--checkpoint", path])
    out = capsys.readouterr().out
    assert line in out and "2 steps in all" in out
    data = fc.folder_dataset(folder, split, verbose=False, min_size=64)
    model = fc.tiny_detector(data.num_classes)
    engine.load_checkpoint(path, model)
    metrics = engine.evaluate(model, engine.make_loader(data, 4, shuffle=False), progress=False)
    present = {data.class_names[int(i)] for _, t in data for i in t["labels"]}
    assert {k for k in metrics if k.startswith("AP50/")} == {f"AP50/{n}" for n in present}


def test_a_missing_or_empty_folder_says_what_it_is(tmp_path):
    import train

    with pytest.raises(SystemExit, match=r"my_dta does not exist: give the folder") as stop:
        train.main(["--data", str(tmp_path / "my_dta"), "--no-amp"])
    assert "neither" not in str(stop.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no annotations: no COCO-format"):
        fc.folder_dataset(str(tmp_path / "empty"))
    (tmp_path / "export.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=r"export.zip is a file, not a folder: unzip it"):
        fc.folder_dataset(str(tmp_path / "export.zip"))


# ─── odd field values, overshooting boxes, EXIF orientation ──────────────────────────────────────


def _edit(part, index, key, value):
    def edit(data, copy):
        if key is None:
            data[part][index] = value
        elif value is KeyError:  # the key misspelt
            data[part][index][key[1]] = data[part][index].pop(key[0])
        else:
            data[part][index][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit("images", 0, "width", "wide"), r"image 100 width: is 'wide', not a number. Give the "
                                          r"image's width and height"),
    (_edit("images", 0, "height", [64]), r"image 100 height: is \[64\], not a number"),
    (_edit("annotations", 0, "bbox", ["ten", 1, 2, 3]), r"annotation 1 bbox \['ten', 1, 2, 3\]: "
                                                        r"is 'ten', not a number. A COCO bbox is"),
    (_edit("annotations", 0, "bbox", None), r"annotation 1: has bbox None, not four numbers"),
    (_edit("annotations", 0, "iscrowd", "no"), r"annotation 1 iscrowd: is 'no', not a number"),
    (_edit("annotations", 0, ("bbox", "box"), KeyError),
     r"annotations\[0\] \(id 1\): has no key 'bbox' \('box' looks like it, misspelt\).*rename"),
    (_edit("images", 1, ("file_name", "filename"), KeyError),
     r"images\[1\] \(id 101\): has no key 'file_name' \('filename' looks like it, misspelt\)"),
    (_edit("annotations", 2, ("category_id", "categoryid"), KeyError),
     r"annotations\[2\] \(id 3\): has no key 'category_id' \('categoryid' looks like it"),
    (_edit("categories", 0, "id", "three"), r"categories\[0\] id: is 'three', not a number. "
                                            r"Category ids are numbers"),
    (_edit("annotations", 0, None, "a box"), r"annotations\[0\]: is 'a box', not an object"),
])
def test_odd_coco_values_name_the_file_record_and_fix(own_coco_folder, tmp_path, edit, message):
    copy = _broken_copy(own_coco_folder, tmp_path, edit)
    with pytest.raises(ValueError, match=r"train.json: " + message):
        fc.CocoFormatDataset(str(copy / "images"), str(copy / "train.json"))


def test_null_sizes_are_read_from_the_image(own_coco_folder, tmp_path):
    copy = _broken_copy(own_coco_folder, tmp_path, _edit("images", 0, "width", None))
    assert coco_data(copy).records[0]["size"] is None and len(coco_data(copy)) == 7


@pytest.mark.parametrize("old, new, count, message", [
    ("<xmin>", "<xmin>abc", 1, r"img1.xml: object 0 \(\w+\) <xmin>: is 'abc[\d.]+', not a number"),
    ("xmax>", "xmx>", 2, r"img1.xml: object 0 \(\w+\): has no <xmax> in <bndbox> \('xmx' looks "
                         r"like it, misspelt\)"),
    ("<width>", "<width>wide", 1, r"img1.xml <size> width: is 'wide64', not a number"),
    ("<name>", "<name> ", 1, None),  # spaces around a name are no error
])
def test_odd_voc_values_name_the_file_object_and_fix(own_voc_folder, tmp_path, old, new, count,
                                                     message):
    copy = str(_voc_copy(own_voc_folder, tmp_path, old, new, count=count))
    if message is None:
        assert fc.VOCFormatDataset(copy).num_classes == 4
        return
    with pytest.raises(ValueError, match=message):
        fc.VOCFormatDataset(copy)


def _overshoot(data, copy):
    data["annotations"][0]["bbox"] = [60, 10, 5.5, 20]  # 1.5 px past the right edge
    data["annotations"][1]["bbox"] = [-1, 5, 10, 10]  # 1 px past the left


def test_boxes_a_pixel_or_two_over_the_edge_are_clipped_in_one_warning(own_coco_folder, tmp_path):
    copy = _broken_copy(own_coco_folder, tmp_path, _overshoot)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = fc.CocoFormatDataset(str(copy / "images"), str(copy / "train.json"), resize=None)
    said = [str(w.message) for w in caught if "ran past" in str(w.message)]
    assert len(said) == 1 and "2 boxes ran past their image's edge by at most 2 px" in said[0]
    boxes = torch.cat([torch.as_tensor(r["boxes"]) for r in data.records])
    assert [60, 10, 64, 30] in boxes.tolist() and [0, 5, 9, 15] in boxes.tolist()


UPRIGHT_OBJECTS = [([8, 6, 40, 30], (230, 60, 60)), ([56, 20, 90, 58], (60, 200, 80))]


def _exif_photo(folder, width, height, boxes):
    """A phone-style JPEG: drawn upright (96 x 64), stored turned (64 x 96) with EXIF orientation
    6; a makesense.ai-style COCO file beside it giving ``width`` x ``height`` and ``boxes``."""
    upright = Image.new("RGB", (96, 64), (30, 30, 30))
    draw = ImageDraw.Draw(upright)
    for (x1, y1, x2, y2), colour in UPRIGHT_OBJECTS:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (folder / "images").mkdir(parents=True)
    stored.save(folder / "images" / "phone.jpg", exif=exif, quality=95)
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for i, (x1, y1, x2, y2) in enumerate(boxes)]
    (folder / "labels_phone.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "phone.jpg", "width": width, "height": height}],
        "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return upright, stored


def _assert_on_objects(sample, size, boxes):
    """The sample is ``size`` (height, width), has ``boxes``, and each box's centre shows the
    colour of the object it was drawn for."""
    image, target = sample
    assert tuple(image.shape[1:]) == size and target["boxes"].tolist() == boxes
    shown = (course.unnormalize(image) * 255).round()
    for (x1, y1, x2, y2), (_, colour) in zip(boxes, UPRIGHT_OBJECTS):
        centre = shown[(y1 + y2) // 2, (x1 + x2) // 2].tolist()
        assert max(abs(a - b) for a, b in zip(centre, colour)) < 12


def test_an_exif_rotated_photo_is_read_upright_with_its_boxes_on_its_objects(tmp_path):
    boxes = [box for box, _ in UPRIGHT_OBJECTS]
    upright, stored = _exif_photo(tmp_path / "phone", 96, 64, boxes)
    assert ImageOps.exif_transpose(Image.open(tmp_path / "phone" / "images" / "phone.jpg")).size \
        == upright.size and stored.size == (64, 96)
    data = fc.folder_dataset(str(tmp_path / "phone"), resize=None)
    _assert_on_objects(data[0], (64, 96), boxes)


def test_a_photo_labelled_as_stored_is_read_as_stored_and_said(tmp_path):
    turned = [[y1, 96 - x2, y2, 96 - x1] for x1, y1, x2, y2 in (b for b, _ in UPRIGHT_OBJECTS)]
    _exif_photo(tmp_path / "labelimg", 64, 96, turned)  # LabelImg shows the stored pixels
    with pytest.warns(UserWarning, match=r"1 images have an EXIF orientation that turns them, but "
                                         r"their annotation gives the stored"):
        data = fc.folder_dataset(str(tmp_path / "labelimg"), resize=None)
    _assert_on_objects(data[0], (96, 64), turned)


def test_an_image_of_another_size_than_its_annotation_is_refused_naming_both(tmp_path):
    _exif_photo(tmp_path / "other", 50, 40, [[1, 1, 9, 9]])
    with pytest.raises(ValueError, match=r"labels_phone.json: image 1: gives its image as 50 x 40 "
                                         r"px, but .*phone.jpg is 96 x 64 px upright \(EXIF "
                                         r"orientation 6 turns the stored 64 x 96\)"):
        fc.folder_dataset(str(tmp_path / "other"))
