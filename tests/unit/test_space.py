"""kvmc/space.py: ENOSPC mapped to one error kind at the service layer, tools, libvirt's text."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kvmc.errors import DiskFull, HypervisorError, ImageError, NotFound
from kvmc.space import disk_full, disk_full_errors, is_no_space, mount_point, tool_error


@disk_full_errors(lambda self: self.root)
class Service:
    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, exc: BaseException) -> None:
        raise exc

    def lines(self):  # noqa: ANN201 - a generator: left alone
        yield 1


def test_enospc_leaves_any_service_as_disk_full(tmp_path: Path) -> None:
    service = Service(tmp_path)
    with pytest.raises(DiskFull) as caught:
        service.write(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "record.json")))
    message = str(caught.value)
    assert message.startswith(f"the disk is full: no space left for {tmp_path / 'x' / 'record.json'} on the file "
                              f"system at {mount_point(tmp_path)} (")
    assert "free)" in message and caught.value.kind == "unavailable" and caught.value.exit_code == 125
    with pytest.raises(DiskFull) as caught:  # libvirt's or a tool's words
        service.write(HypervisorError("cannot save VM kvmc-pool-1: operation failed: No space left on device"))
    assert "cannot save VM" in str(caught.value) and str(tmp_path) in str(caught.value)
    with pytest.raises(DiskFull):
        service.write(OSError(errno.EDQUOT, "Disk quota exceeded"))
    for other in (OSError(errno.EACCES, "Permission denied"), NotFound("no such thing"), ImageError("bad layer")):
        with pytest.raises(type(other)):
            service.write(other)
    assert list(service.lines()) == [1]


def test_tool_errors(tmp_path: Path) -> None:
    assert tool_error("mkfs.ext4: Could not allocate block in ext2 filesystem", tmp_path) is None
    full = tool_error("qemu-img: x.qcow2: Could not create: No space left on device", tmp_path)
    assert isinstance(full, DiskFull) and "Could not create" in str(full)
    assert is_no_space(full) and not is_no_space(ValueError("No space left on device"))


def test_disk_full_names_the_nearest_existing_file_system(tmp_path: Path) -> None:
    error = disk_full(tmp_path / "not" / "yet" / "there")
    assert str(mount_point(tmp_path)) in str(error) and "kvmc system prune" in str(error)
