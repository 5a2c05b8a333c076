import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from policy_server.errors import PolicyLoadError
from policy_server.loading import archive as archive_module
from policy_server.loading.archive import (
    extract_cached,
    file_digest,
    safe_extract,
)
from policy_server.runtime.saved_model import find_saved_model


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


def entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


def special_file(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr(entry("saved_model.pb", stat.S_IFREG | 0o644), b"pb")
        bundle.writestr(entry("variables/fifo", stat.S_IFIFO | 0o644), b"")


def symlink(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr(entry("variables", stat.S_IFLNK | 0o777), "/etc")
        bundle.writestr("variables/passwd", b"x")


def patched_central_offset(path: Path, offset_of_second: int | None) -> None:
    """Two stored entries; the second's directory record then points into the first's data
    (or at the first's own header when `offset_of_second` is None): a zip's hard link."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr("saved_model.pb", b"A" * 1000)
        bundle.writestr("variables/variables.index", b"B" * 1000)
    data = bytearray(path.read_bytes())
    second = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)
    offset = 0 if offset_of_second is None else offset_of_second
    data[second + 42 : second + 46] = offset.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def duplicate_names(path: Path) -> None:
    make_zip(path, {"saved_model.pb": b"one", "saved_model.pX": b"two"})
    path.write_bytes(path.read_bytes().replace(b"saved_model.pX", b"saved_model.pb"))


def huge_claimed_size(path: Path) -> None:
    make_zip(path, {"saved_model.pb": b"small"})
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def expands_past_the_cap(path: Path) -> None:
    # 20 MB of zeros deflate to about 20 kB: a thousandfold expansion.
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle,
        bundle.open("variables/variables.data-00000-of-00001", "w") as sink,
    ):
        for _ in range(20):
            sink.write(bytes(1 << 20))


def expands_past_the_cap_claiming_less(path: Path) -> None:
    expands_past_the_cap(path)
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def truncated(path: Path) -> None:
    make_zip(path, {"saved_model.pb": b"pb" * 500, "variables/v": b"v" * 500})
    path.write_bytes(path.read_bytes()[:-40])


def damaged(path: Path) -> None:
    make_zip(path, {"saved_model.pb": bytes(range(256)) * 20})
    data = bytearray(path.read_bytes())
    data[60:80] = b"\xff" * 20  # inside the compressed data
    path.write_bytes(bytes(data))


def not_a_zip(path: Path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>")


def escaping(name: str) -> Callable[[Path], object]:
    return lambda path: make_zip(path, {"saved_model.pb": b"pb", name: b"x"})


HOSTILE: dict[str, tuple[Callable[[Path], object], str]] = {
    "parent": (escaping("../evil.txt"), "would escape the folder"),
    "deep parent": (escaping("variables/../../../evil.txt"), "would escape the folder"),
    "absolute": (escaping("/tmp/evil.txt"), "would escape the folder"),
    "windows drive": (escaping("C:/Windows/evil.txt"), "would escape the folder"),
    "windows drive backslash": (escaping("C:\\evil.txt"), "would escape the folder"),
    "windows parent": (escaping("..\\evil.txt"), "would escape the folder"),
    "unc path": (escaping("\\\\host\\share\\evil.txt"), "would escape the folder"),
    "symbolic link": (symlink, "refuses symbolic link 'variables'"),
    "special file": (special_file, "is a special file"),
    "shared data": (lambda p: patched_central_offset(p, None), "entries share their data"),
    "overlapping data": (lambda p: patched_central_offset(p, 100), "entries share their data"),
    "duplicate names": (duplicate_names, "'saved_model.pb' appears more than once"),
    "huge claimed size": (huge_claimed_size, "unzips to more than 10000000 bytes"),
    "expands past the cap": (expands_past_the_cap, "unzips to more than 10000000 bytes"),
    "claims less than it expands to": (expands_past_the_cap_claiming_less, "damaged"),
    "not a zip": (not_a_zip, "not a valid zip archive"),
    "truncated": (truncated, "damaged or truncated"),
    "damaged": (damaged, "damaged or truncated"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_is_written(tmp_path: Path, kind: str) -> None:
    build, expected = HOSTILE[kind]
    archive = tmp_path / "policy" / "saved_model.zip"
    archive.parent.mkdir()
    build(archive)
    cache = tmp_path / "cache"
    with pytest.raises(PolicyLoadError) as error:
        extract_cached(archive, cache, 10_000_000)
    message = str(error.value)
    assert message.startswith(f"{archive}: ") and expected in message, message
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert written == ["cache", f"cache/{file_digest(archive)}", "policy", "policy/saved_model.zip"]
    assert not Path("/tmp/evil.txt").exists()


def test_too_many_entries_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_module, "MAX_ENTRIES", 3)
    archive = make_zip(tmp_path / "m.zip", {f"variables/{i}": b"" for i in range(4)})
    with pytest.raises(PolicyLoadError, match="has 4 entries, more than the 3"):
        safe_extract(archive, tmp_path / "out", 1000)


def test_finds_the_saved_model_at_the_top_or_one_folder_down(tmp_path: Path) -> None:
    (tmp_path / "top" / "variables").mkdir(parents=True)
    (tmp_path / "top" / "saved_model.pb").write_bytes(b"pb")
    assert find_saved_model(tmp_path / "top") == tmp_path / "top"
    nested = tmp_path / "nested" / "saved_model"
    nested.mkdir(parents=True)
    (nested / "saved_model.pb").write_bytes(b"pb")
    (tmp_path / "nested" / "events.out.tfevents.1.host").write_bytes(b"")
    assert find_saved_model(tmp_path / "nested") == nested


def test_no_saved_model_or_several_are_refused_naming_the_source(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no model here")
    with pytest.raises(PolicyLoadError, match=r"^policy/saved_model.zip: not a SavedModel"):
        find_saved_model(tmp_path, "policy/saved_model.zip")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_bytes(b"pb")
    with pytest.raises(PolicyLoadError, match=r"holds several SavedModels \(a, b\)"):
        find_saved_model(tmp_path)
