import pytest

from ensemble.errors import DataError
from ensemble.jsonl import read_jsonl


def test_reads_objects_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"b": "é"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}]
    assert read_jsonl(path, line_numbers=True) == [{"a": 1, "_line": 1}, {"b": "é", "_line": 3}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}\n{"a": \n', "rows.jsonl:2: not valid JSON"),
        ('{"a": 1}\n[1, 2]\n', "rows.jsonl:2: each line must be a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
