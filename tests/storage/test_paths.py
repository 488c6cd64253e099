import os

import pytest

from caikit_tuning.storage import resolve_under


def test_names_resolve_inside_the_root(tmp_path):
    assert resolve_under(tmp_path, "a/b", "f") == (tmp_path / "a" / "b").resolve()


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/etc", "~/x", "a//b", "./a", "", "C:\\x", "a\x00b"]
)
def test_escapes_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="`model_id`"):
        resolve_under(tmp_path, name, "model_id")


def test_symlinks_leaving_the_root_are_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "link")
    with pytest.raises(ValueError, match="resolves outside"):
        resolve_under(tmp_path / "root", "link", "model_id")
