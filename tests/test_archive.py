import stat
import zipfile
from pathlib import Path

import pytest

from policy_server.archive import extract_cached, safe_extract
from policy_server.errors import PolicyLoadError


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_refuses_entries_that_escape(tmp_path: Path, name: str) -> None:
    archive = make_zip(tmp_path / "m.zip", {name: b"x"})
    with pytest.raises(PolicyLoadError, match="escape"):
        safe_extract(archive, tmp_path / "out", 1000)
    assert not (tmp_path / "evil.txt").exists()


def test_refuses_symbolic_links(tmp_path: Path) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "/etc/passwd")
    with pytest.raises(PolicyLoadError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out", 1000)


def test_caps_extracted_size_even_if_the_directory_lies(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "m.zip", {"big": b"0" * 10_000})
    with pytest.raises(PolicyLoadError, match="more than 5000 bytes"):
        safe_extract(archive, tmp_path / "out", 5000)
    # Forge the central directory's size: the streamed byte count still stops it.
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as bundle:
        info = bundle.getinfo("big")
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(PolicyLoadError):
        safe_extract(archive, tmp_path / "out2", 5000)
    assert info.file_size == 10_000


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "m.zip"
    archive.write_bytes(b"not a zip")
    with pytest.raises(PolicyLoadError, match="not a valid zip"):
        safe_extract(archive, tmp_path / "out", 1000)


def test_extracts_once_into_a_folder_keyed_by_hash(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "m.zip", {"saved_model.pb": b"pb", "variables/v": b"v"})
    first = extract_cached(archive, tmp_path / "cache", 1000)
    assert (first / "variables" / "v").read_bytes() == b"v"
    assert len(first.parent.name) == 64
    (first / "marker").write_text("kept")
    assert extract_cached(archive, tmp_path / "cache", 1000) == first
    assert (first / "marker").exists()
    other = make_zip(tmp_path / "n.zip", {"saved_model.pb": b"other"})
    assert extract_cached(other, tmp_path / "cache", 1000) != first
    assert not list((tmp_path / "cache").glob("*/.extract-*"))
