"""Readers for Med-GRIT (test and training layouts) and ShareGPT, and how they treat bad items."""

import json

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
    assert (r.modality, r.question, r.answer, r.source) == ("ct", "<img>x</img> Q?", "A.", "f.json[0] id=ct_00--a--c1--x_0001")
    assert r.images == (str(image_dir / "ct_00--a--c1--x_0001.png"),)
    (t,) = read_medgrit(train, str(image_dir))
    assert [x.role for x in t.turns] == ["user", "assistant"] * 2 and t.modality == "mr"


def test_sharegpt(tmp_path, image_dir):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": "Here."}],
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
    assert f"{len(BAD)} item(s) skipped" in report and "f.json[10] id=ct_00--zz--missing--x_0009" not in report  # one example each
    assert "f.json[9] id=ct_00--zz--missing--x_0009: missing image file" in report


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
