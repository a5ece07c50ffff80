"""backend.data.load: every accepted source, and an error that names the path for each failure."""

import shutil

import datasets
import pytest

from backend.data import DataError, load
from conftest import DATA

ALPACA = DATA / "alpaca" / "alpaca_en_demo.json"
PIRATE = DATA / "openai" / "pirate_training_set.jsonl"


def test_json_and_jsonl_files():
    ds = load(ALPACA)
    assert len(ds) == 999 and set(ds.column_names) == {"instruction", "input", "output"}
    ds = load(str(PIRATE))
    assert len(ds) == 10 and ds.column_names == ["messages"]


@pytest.mark.parametrize("ext", ["csv", "parquet", "arrow"])
def test_tabular_files(tmp_path, ext):
    src = load(ALPACA).select(range(20))
    path = tmp_path / f"part.{ext}"
    if ext == "csv":
        src.to_csv(path, index=False)
    elif ext == "parquet":
        src.to_parquet(path)
    else:
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, src.data.schema) as writer:
            writer.write_table(src.data.table)
    ds = load(path)
    assert len(ds) == 20
    assert ds[3]["instruction"] == src[3]["instruction"]


def test_txt_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first line\nsecond line\n")
    ds = load(path)
    assert ds["text"][:] == ["first line", "second line"]


def test_directory_of_files_and_save_to_disk(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(PIRATE, folder / "train.jsonl")
    assert len(load(folder)) == 10

    saved = tmp_path / "saved"
    load(ALPACA).select(range(7)).save_to_disk(saved)
    assert len(load(saved)) == 7

    dsd = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": load(PIRATE), "test": load(PIRATE).select(range(2))}).save_to_disk(dsd)
    assert len(load(dsd, split="test")) == 2
    with pytest.raises(DataError, match=r"no split 'validation'.*train, test"):
        load(dsd, split="validation")
    assert len(load(dsd, split=None)) == 12  # all splits


def test_split_on_a_single_file(tmp_path):
    with pytest.raises(DataError, match=r"no split 'test'; it has train"):
        load(ALPACA, split="test")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        load(tmp_path / "nope.json")
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"data\.xlsx: unknown file type '\.xlsx'; expected one of"):
        load(bad)


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl"):
        load(empty)
    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json"):
        load(empty_list)


def test_unparseable_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "a", "output": ')
    with pytest.raises(DataError, match=r"broken\.json: line 1, column \d+: not valid JSON"):
        load(bad)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 3, column 7: not valid JSON"):
        load(lines)


def test_a_folder_of_files_with_different_columns_names_them(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (tmp_path / "b.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"a\.jsonl has instruction, output; b\.jsonl has messages"):
        load(tmp_path)


def test_hub_id_goes_to_load_dataset(monkeypatch):
    """The Hub cannot be reached here: this mock stands in for it and checks the
    call our code makes for a Hub id (path, name, split selection)."""
    calls = []

    def fake_load_dataset(path, name=None, data_files=None, **kw):
        calls.append((path, name, data_files))
        rows = [{"text": "### Human: hi ### Assistant: hello"}]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                     "test": datasets.Dataset.from_list(rows * 2)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load("timdettmers/openassistant-guanaco")
    assert calls == [("timdettmers/openassistant-guanaco", None, None)]
    assert len(ds) == 1
    assert len(load("timdettmers/openassistant-guanaco", split="test", name="cfg")) == 2
    assert calls[-1][1] == "cfg"
    with pytest.raises(DataError, match=r"timdettmers/openassistant-guanaco: no split 'dev'; it has train, test"):
        load("timdettmers/openassistant-guanaco", split="dev")


def test_hub_failure_is_explained(monkeypatch):
    def offline(path, **kw):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"org/name: cannot be loaded .*Hub id"):
        load("org/name")


def test_relative_looking_path_is_not_sent_to_the_hub(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not reach load_dataset"))
    with pytest.raises(DataError, match="no such file"):
        load("./data/train.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load("some/deep/path")
