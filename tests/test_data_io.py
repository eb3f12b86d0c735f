import json
import logging
import os
import re

import pytest

from lightning_lab.data.io import DataError, JsonlWriter, read_jsonl, read_lines, read_yaml_or_json, write_json_atomic


def test_read_jsonl_numbers_lines_and_skips_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,\n{"a": 3}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: malformed JSON"):
        list(read_jsonl(path))


def test_a_byte_that_is_not_utf8_is_named_at_its_own_line(tmp_path):
    """Far past the decoder's first buffer (8 KiB): the line number is the bad byte's, not the buffer's."""
    path = tmp_path / "x.jsonl"
    lines = [json.dumps({"id": i, "text": "padding " * 4}).encode() for i in range(3000)]
    lines[2500] = b'{"id": 2500, "text": "caf\xe9"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2501: not UTF-8 \(byte 0xe9 at column 26\)"):
        list(read_jsonl(path))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2501: not UTF-8"):
        list(read_lines(path))


def test_read_jsonl_rejects_non_object_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_read_jsonl_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_write_json_atomic_replaces_content_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "heartbeat.json"
    write_json_atomic(path, {"step": 1})
    write_json_atomic(path, {"step": 2, "text": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 2, "text": "é"}
    assert os.listdir(path.parent) == ["heartbeat.json"]


def test_write_json_atomic_failure_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"step": 1})

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_json_atomic(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_jsonl_writer_appends_and_reports_done_ids(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    with JsonlWriter(path) as out:
        assert out.done_ids() == set()
        out.write({"id": "a", "score": 1.0})
        out.write({"id": 7, "score": 0.0})
        out.write({"note": "no id"})
        assert out.done_ids() == {"a", "7"}
    with JsonlWriter(path) as out:  # a rerun sees what the first run finished
        assert out.done_ids() == {"a", "7"}
        out.write({"id": "b"})
    assert [record.get("id") for _, record in read_jsonl(path)] == ["a", 7, None, "b"]


def test_jsonl_writer_custom_id_key(tmp_path):
    path = tmp_path / "r.jsonl"
    with JsonlWriter(path, id_key="task_id") as out:
        out.write({"task_id": "HumanEval/0", "id": "ignored"})
    assert JsonlWriter(path, id_key="task_id").done_ids() == {"HumanEval/0"}


def test_jsonl_writer_truncates_torn_last_line_with_warning(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "compl')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="lightning_lab.data.io"):
        out = JsonlWriter(path)
    assert f"{path}:3: dropping a torn last line" in caplog.text
    assert out.done_ids() == {"a", "b"}
    out.write({"id": "c", "completion": "done"})
    out.close()
    assert [record["id"] for _, record in read_jsonl(path)] == ["a", "b", "c"]


def test_jsonl_writer_keeps_complete_last_line_without_newline(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    with caplog.at_level(logging.WARNING, logger="lightning_lab.data.io"), JsonlWriter(path) as out:
        assert out.done_ids() == {"a", "b"}
        out.write({"id": "c"})
    assert "torn" not in caplog.text
    assert [record["id"] for _, record in read_jsonl(path)] == ["a", "b", "c"]


def test_jsonl_writer_refuses_malformed_middle_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: malformed JSON"):
        JsonlWriter(path)


def test_jsonl_writer_rejects_unserialisable_record(tmp_path):
    with JsonlWriter(tmp_path / "r.jsonl") as out, pytest.raises(DataError, match="r.jsonl: record is not JSON"):
        out.write({"id": "a", "value": object()})


def test_read_yaml_or_json(tmp_path):
    (tmp_path / "c.yaml").write_text("model: smollm2-135m\nlr: 0.001\n")
    (tmp_path / "c.json").write_text('{"model": "x"}')
    (tmp_path / "empty.yml").write_text("")
    assert read_yaml_or_json(tmp_path / "c.yaml") == {"model": "smollm2-135m", "lr": 0.001}
    assert read_yaml_or_json(tmp_path / "c.json") == {"model": "x"}
    assert read_yaml_or_json(tmp_path / "empty.yml") == {}


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("bad.yaml", "a: 1\nb: [1, 2\n", r"bad.yaml:\d+: malformed YAML"),
        ("bad.json", '{\n"a": }', r"bad.json:2: malformed JSON"),
        ("list.yaml", "- 1\n- 2\n", r"list.yaml: expected a mapping"),
        ("c.toml", "a = 1", r"c.toml: unsupported config type"),
    ],
)
def test_read_yaml_or_json_errors_name_the_file(tmp_path, name, text, error):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=error):
        read_yaml_or_json(tmp_path / name)
