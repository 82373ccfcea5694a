"""Atomic outputs: a folder output replaces a file left by an older layout, and the other way
round; a failure leaves what was there."""

from __future__ import annotations

import pytest

from asclepius_r.files import atomic_path


@pytest.mark.parametrize("old_is_dir", [False, True])
@pytest.mark.parametrize("new_is_dir", [False, True])
def test_atomic_path_replaces_a_file_or_a_folder(tmp_path, old_is_dir, new_is_dir):
    target = tmp_path / "discharge.parquet"
    if old_is_dir:
        target.mkdir()
        (target / "part-00000.parquet").write_text("old")
    else:
        target.write_text("old")
    with atomic_path(target, is_dir=new_is_dir) as tmp:
        if new_is_dir:
            (tmp / "part-00000.parquet").write_text("new")
        else:
            tmp.write_text("new")
    assert target.is_dir() == new_is_dir
    assert (target / "part-00000.parquet" if new_is_dir else target).read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["discharge.parquet"]


def test_a_failure_leaves_the_old_output(tmp_path):
    target = tmp_path / "out"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, is_dir=True) as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
