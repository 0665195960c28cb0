"""Cached model folders are published in one rename, safely when several processes build them."""

from __future__ import annotations

from harness.models.zoo import temp_folder_beside, publish_folder


def _built(folder, marker: str):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(marker)
    return folder


def test_a_finished_folder_is_published(tmp_path):
    dest = tmp_path / "models" / "m"
    tmp = _built(temp_folder_beside(dest), "ours")
    assert tmp.parent == dest.parent and tmp != temp_folder_beside(dest)  # private to this call
    publish_folder(tmp, dest)
    assert (dest / "config.json").read_text() == "ours" and not tmp.exists()


def test_a_folder_another_process_published_first_is_kept(tmp_path):
    dest = _built(tmp_path / "models" / "m", "theirs")
    tmp = _built(temp_folder_beside(dest), "ours")
    publish_folder(tmp, dest)
    assert (dest / "config.json").read_text() == "theirs" and not tmp.exists()


def test_an_incomplete_folder_is_replaced(tmp_path):
    dest = tmp_path / "models" / "m"
    dest.mkdir(parents=True)  # a crash left it without config.json
    tmp = _built(temp_folder_beside(dest), "ours")
    publish_folder(tmp, dest)
    assert (dest / "config.json").read_text() == "ours"
