"""Readers for Med-GRIT (test and training layouts) and ShareGPT, and how they treat bad items."""

import json
import os

import pytest
from PIL import Image

from clinkd_jax.data.records import DataError, SkipLog, read_medgrit, read_sharegpt


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for stem in ("ct_00--a--c1--x_0001", "mr_t1--b--c2--x_0002", "foo_00--c--c3--x_0003"):
        Image.new("RGB", (32, 32)).save(d / f"{stem}.png")
    return d


def write(tmp_path, items, name="f.json"):
    p = tmp_path / name
    p.write_text(json.dumps(items))
    return str(p)


def test_test_and_train_layouts(tmp_path, image_dir):
    test = write(tmp_path, [{"id": "ct_00--a--c1--x_0001", "conversations": [["<img>x</img> Q?", "A."]]}])
    train = write(tmp_path, [{"id": "mr_t1--b--c2--x_0002", "conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "user", "value": "Q2"}, {"from": "assistant", "value": "A2"}]}], "t.json")
    (r,) = read_medgrit(test, str(image_dir))
    assert (r.modality, r.question, r.answer, r.source) == ("ct", "<img>x</img> Q?", "A.",
                                                            "f.json[0] id=ct_00--a--c1--x_0001")
    assert r.images == (str(image_dir / "ct_00--a--c1--x_0001.png"),)
    (t,) = read_medgrit(train, str(image_dir))
    assert [x.role for x in t.turns] == ["user", "assistant"] * 2 and t.modality == "mr"


def test_sharegpt(tmp_path, image_dir):
    path = write(tmp_path,
                 [{"messages": [{"role": "user", "content": "<image>Where?"},
                                {"role": "assistant", "content": "Here."}],
                             "images": ["ct_00--a--c1--x_0001.png"]}])
    (r,) = read_sharegpt(path, str(image_dir))
    assert r.id == "ct_00--a--c1--x_0001" and r.modality == "ct" and r.answer == "Here."



def test_jsonl(tmp_path, image_dir):
    """`*.jsonl`: one item per line (blank lines ignored); a broken line is named by its number."""
    item = {"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Here."}],
            "images": ["ct_00--a--c1--x_0001.png"]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(item) + "\n\n" + json.dumps({**item, "id": "second"}) + "\n")
    assert [r.id for r in read_sharegpt(str(path), str(image_dir))] == ["ct_00--a--c1--x_0001", "second"]
    path.write_text(json.dumps(item) + "\n{broken\n")
    with pytest.raises(DataError, match="c.jsonl, line 2: not valid JSON"):
        read_sharegpt(str(path), str(image_dir))


BAD = [
    ("not a dict", "malformed item"),
    ({"id": "ct_00--a--c1--x_0001"}, "malformed item"),
    ({"id": "ct_00--a--c1--x_0001", "conversations": [["q"]]}, "malformed item"),
    ({"id": "ct_00--a--c1--x_0001", "conversations": [["q", ""]]}, "empty or missing answer"),
    ({"id": "ct_00--a--c1--x_0001", "conversations": [{"from": "user", "value": "q"}]}, "empty or missing answer"),
    ({"id": "foo_00--c--c3--x_0003", "conversations": [["q", "a"]]}, "unknown modality prefix"),
    ({"id": "ct_00--a--c1--x_0001", "conversations": [["q", "<box>(1,2),(3000,4)</box>"]]}, "bad box"),
    ({"id": "ct_00--a--c1--x_0001", "conversations": [["q", "<box>(1,2)</box>"]]}, "bad box"),
    ({"id": "ct_00--a--c1--x_0001", "conversations": [["q <|image_pad|> twice", "a"]]}, "special token in text"),
    ({"id": "ct_00--zz--missing--x_0009", "conversations": [["q", "a"]]}, "missing image file"),
]


def test_bad_items_are_counted_by_reason(tmp_path, image_dir):
    good = {"id": "ct_00--a--c1--x_0001", "conversations": [["q", "a"]]}
    path = write(tmp_path, [good] + [item for item, _ in BAD] + [good])
    log = SkipLog()
    assert len(read_medgrit(path, str(image_dir), log=log)) == 2
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(log.counts) == expected and log.total == len(BAD)
    report = log.report()
    # one example each
    assert f"{len(BAD)} item(s) skipped" in report and "f.json[11] id=ct_00--zz--missing--x_0009" not in report
    assert "f.json[10] id=ct_00--zz--missing--x_0009: missing image file" in report


@pytest.mark.parametrize("item, reason", BAD)
def test_strict_mode_names_file_and_item(tmp_path, image_dir, item, reason):
    path = write(tmp_path, [item])
    with pytest.raises(DataError, match=f"f.json\\[0\\].*{reason}"):
        read_medgrit(path, str(image_dir), log=SkipLog(strict=True))


def test_unreadable_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="x.json: not valid JSON"):
        read_medgrit(str(tmp_path / "x.json"), str(tmp_path))
    with pytest.raises(DataError, match="nope.json: file not found"):
        read_medgrit(str(tmp_path / "nope.json"), str(tmp_path))


def test_box_formats_are_told_per_file_and_logged(tmp_path, image_dir, caplog):
    """A file of 0-1 float boxes is brought to the model's 0-1000 integers (questions and answers), a file of
    0-1000 integers is read as is; each choice is logged with the file's name; no item is lost to "bad box"."""
    unit = [{"id": "ct_00--a--c1--x_0001", "conversations": [["Where is the <ref>liver</ref>?",
                                                              "<box>(0.1,0.2),(0.5,0.75)</box>"]]},
            {"id": "ct_00--a--c1--x_0001", "conversations": [["What is in <box>(0,0),(1,1)</box>?", "liver"]]}]
    ints = [{"id": "ct_00--a--c1--x_0001", "conversations": [["Where?", "<box>(100,200),(500,750)</box>"]]}]
    log = SkipLog()
    with caplog.at_level("INFO", logger="clinkd_jax.data"):
        a = read_medgrit(write(tmp_path, unit, "unit.json"), str(image_dir), log=log)
        b = read_medgrit(write(tmp_path, ints, "ints.json"), str(image_dir), log=log)
    assert log.total == 0 and len(a) == 2 and len(b) == 1
    assert a[0].answer == b[0].answer == "<box>(100,200),(500,750)</box>"
    assert a[1].question == "What is in <box>(0,0),(1000,1000)</box>?"
    messages = [r.getMessage() for r in caplog.records]
    assert "unit.json: 2 box(es), 0-1 floats: converted to the model's 0-1000 integers" in messages
    assert "ints.json: 1 box(es), 0-1000 integers" in messages
    forced = read_medgrit(write(tmp_path, unit, "unit.json"), str(image_dir), log=log, box_format="0-1000")
    assert len(forced) == 1 and log.counts == {"bad box": 1}  # told the wrong format: the float box is named


def test_image_extensions_are_searched_in_order(tmp_path, image_dir):
    """Med-GRIT ids carry no extension: the first of `image_ext` that exists is used (DICOM included); a
    missing image is reported under the first candidate's name."""
    (image_dir / "mr_t1--b--c2--x_0002.dcm").write_bytes(b"")  # .png exists as well: PNG comes first
    (image_dir / "ct_00--d--c4--x_0004.dcm").write_bytes(b"")
    items = [{"id": i, "conversations": [["q", "a"]]} for i in ("mr_t1--b--c2--x_0002", "ct_00--d--c4--x_0004")]
    path = write(tmp_path, items)
    got = [os.path.basename(r.images[0]) for r in read_medgrit(path, str(image_dir))]
    assert got == ["mr_t1--b--c2--x_0002.png", "ct_00--d--c4--x_0004.dcm"]
    dcm_first = read_medgrit(path, str(image_dir), image_ext=(".dcm", ".png"))
    assert [os.path.basename(r.images[0]) for r in dcm_first] == ["mr_t1--b--c2--x_0002.dcm",
                                                                  "ct_00--d--c4--x_0004.dcm"]
    log = SkipLog()
    assert read_medgrit(path, str(image_dir), log=log, image_ext=(".jpg",)) == []
    assert log.examples["missing image file"][0].endswith("mr_t1--b--c2--x_0002.jpg)")
