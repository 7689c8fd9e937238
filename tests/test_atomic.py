"""The one atomic-write mechanism every checkpoint, conversion and report goes through."""

import pytest

from gemmaforge import atomic


def test_publish_dir_replaces_an_existing_dir_or_file(tmp_path):
    for existing in ("dir", "file"):
        final = tmp_path / existing
        if existing == "dir":
            final.mkdir()
            (final / "old.txt").write_text("old")
        else:
            final.write_text("old")
        with atomic.publish_dir(final) as stage:
            (stage / "new.txt").write_text("new")
        assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # no staging or .old leftovers


def test_publish_dir_failure_keeps_the_old_target(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic.publish_dir(final) as stage:
            (stage / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_write_json_leaves_no_temp_file(tmp_path):
    atomic.write_json(tmp_path / "r.json", {"a": 1})
    atomic.write_json(tmp_path / "r.json", {"a": 2})
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
