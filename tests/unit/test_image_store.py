"""Image store tests against the real tools (skopeo, umoci, mke2fs, debugfs); no mocks.

Hostile and malformed inputs are crafted by hand with tarfile: docker-archive tarballs
(manifest.json + config + layer.tar) and, for the opaque whiteout umoci never writes,
a layer appended to an OCI layout with its digests recomputed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvmc.errors import ImageError, ImageNotFound
from kvmc.images import (
    ImageStore,
    add_layer,
    build_busybox_image,
    build_busybox_layout,
    normalize_name,
    pull_source,
)
from kvmc.images.layers import LayerScanner



# ------------------------------------------------------------------ helpers


def debugfs(disk: Path, request: str) -> str:
    proc = subprocess.run(
        [shutil.which("debugfs", path="/usr/sbin:/sbin:/usr/bin") or "debugfs", "-R", request, str(disk)],
        capture_output=True, text=True, check=True,
    )
    return proc.stdout + proc.stderr


def names_in(disk: Path, directory: str) -> set[str]:
    out = debugfs(disk, f"ls -p {directory}")
    # "ls -p" prints /inode/mode/uid/gid/name/size/ per entry.
    return {line.split("/")[5] for line in out.splitlines() if line.startswith("/")} - {".", ".."}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", link: str = "", mode: int = 0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    info.mtime = 1704067200
    if kind != tarfile.REGTYPE:
        data = None
    return info, data


def make_docker_archive(dest: Path, layers: list[list[tuple[tarfile.TarInfo, bytes | None]]], repo_tag: str) -> Path:
    """A minimal ``docker save`` tarball: manifest.json, <config digest>.json, N/layer.tar."""
    blobs = [tar_bytes(members) for members in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha256(b)}" for b in blobs]},
    }
    config_bytes = json.dumps(config).encode()
    config_name = f"{sha256(config_bytes)}.json"
    layer_names = [f"{i}/layer.tar" for i in range(len(blobs))]
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    files = {"manifest.json": json.dumps(manifest).encode(), config_name: config_bytes}
    files.update(zip(layer_names, blobs, strict=True))
    with tarfile.open(dest, "w") as out:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return dest


def zstd_compress(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def append_raw_layer(
    layout: Path, tag: str, members: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = "gzip"
) -> None:
    """Append a hand-made layer to ``layout:tag``, rewriting config, manifest and index."""

    def put(data: bytes) -> dict:
        digest = sha256(data)
        (layout / "blobs/sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    def get(desc: dict) -> dict:
        return json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())

    index = json.loads((layout / "index.json").read_bytes())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = get(desc)
    config = get(manifest["config"])
    raw = tar_bytes(members)
    blob = zstd_compress(raw) if compression == "zstd" else gzip.compress(raw, mtime=0)
    layer_desc = put(blob)
    manifest["layers"].append({"mediaType": f"application/vnd.oci.image.layer.v1.tar+{compression}", **layer_desc})
    config["rootfs"]["diff_ids"].append(f"sha256:{sha256(raw)}")
    config.setdefault("history", []).append({"created": "2024-01-01T00:00:00Z", "created_by": "test: raw layer"})
    manifest["config"].update(put(json.dumps(config).encode()))
    desc.update(put(json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))


def image_dirs(store: ImageStore) -> list[str]:
    return [p.name for p in store.root.iterdir() if not p.name.startswith(".") and p.is_dir()]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_layout(tmp_path_factory.mktemp("bb") / "layout", "latest")


@pytest.fixture
def layout_copy(busybox_layout: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "layout"
    shutil.copytree(busybox_layout, dest)
    for p in dest.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)  # umoci writes blobs read-only
    return dest


@pytest.fixture
def systmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private system tmp dir, so tests can assert the store leaves no scratch behind."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture
def store(tmp_path: Path, systmp: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("given", "stored", "pulled"),
    [
        ("busybox", "busybox:latest", "docker://docker.io/library/busybox:latest"),
        ("alpine:3.19", "alpine:3.19", "docker://docker.io/library/alpine:3.19"),
        ("docker.io/library/alpine", "alpine:latest", "docker://docker.io/library/alpine:latest"),
        ("foo/bar:v1", "foo/bar:v1", "docker://docker.io/foo/bar:v1"),
        ("docker.io/foo/bar:v1", "foo/bar:v1", "docker://docker.io/foo/bar:v1"),
        ("localhost:5000/x/y", "localhost:5000/x/y:latest", "docker://localhost:5000/x/y:latest"),
        ("ghcr.io/o/i:1.0", "ghcr.io/o/i:1.0", "docker://ghcr.io/o/i:1.0"),
    ],
)
def test_names_are_normalised_docker_style(given: str, stored: str, pulled: str) -> None:
    assert normalize_name(given) == stored
    assert pull_source(given) == pulled


@pytest.mark.parametrize("bad", ["Busybox", "foo:bad tag", "", "a//b"])
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(ImageError, match="invalid image name"):
        normalize_name(bad)


# ------------------------------------------------------------------ busybox image


def test_busybox_image_build_import_lookup_remove(store: ImageStore, systmp: Path) -> None:
    image = build_busybox_image(store)

    assert image.tags == ["kvmc/busybox:latest"]
    assert image.disk_path == store.root / image.id / "rootfs.ext4"
    assert image.disk_path.stat().st_mode & 0o777 == 0o444
    assert image.config.cmd == ["sh"]
    assert image.config.entrypoint is None
    assert any(e.startswith("PATH=") for e in image.config.env)
    assert image.os == "linux" and image.architecture
    assert image.short_id == image.id[:12]
    assert json.loads(json.dumps(image.to_dict()))["config"]["cmd"] == ["sh"]
    # Sparse disk with at least 1 GiB of room on top of ~2 MB of content.
    assert image.disk_size >= image.size + 2**30
    assert image.disk_path.stat().st_blocks * 512 < 64 * 2**20
    # The config is kept byte for byte: its sha256 is the id.
    assert sha256((store.root / image.id / "config.json").read_bytes()) == image.id

    bin_listing = debugfs(image.disk_path, "ls -l /bin")
    assert "busybox" in bin_listing and "sh" in names_in(image.disk_path, "/bin")
    assert "app:x:1000:1000" in debugfs(image.disk_path, "cat /etc/passwd")
    assert "Mode:  01777" in debugfs(image.disk_path, "stat /tmp")
    assert "User:  1000   Group:  1000" in debugfs(image.disk_path, "stat /home/app")

    assert store.get("kvmc/busybox").id == image.id
    assert store.get("kvmc/busybox:latest").id == image.id
    assert store.get(image.id[:6]).id == image.id
    assert store.get(f"sha256:{image.id}").id == image.id
    assert [i.id for i in store.list()] == [image.id]

    # Re-import of the same image only adds the tag.
    again = build_busybox_image(store, "other:1")
    assert again.id == image.id and again.tags == ["kvmc/busybox:latest", "other:1"]
    assert len(image_dirs(store)) == 1

    tagged = store.tag("other:1", "third")
    assert "third:latest" in tagged.tags
    with pytest.raises(ImageError, match="several tags"):
        store.remove(image.id)
    assert store.remove("other:1").deleted is None
    assert store.remove("third").untagged == ["third:latest"]
    result = store.remove("kvmc/busybox")
    assert result.deleted == image.id
    assert not (store.root / image.id).exists()
    assert store.list() == []
    with pytest.raises(ImageNotFound, match='"kvmc/busybox:latest" not found: import it with "kvmc image import"'):
        store.get("kvmc/busybox")
    assert list(systmp.iterdir()) == []
    assert list((store.root / ".staging").iterdir()) == []


def test_docker_archive_import_gives_the_same_id(store: ImageStore, busybox_layout: Path, tmp_path: Path) -> None:
    oci_image = store.import_path(busybox_layout, "bb:oci")
    archive = tmp_path / "bb.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{busybox_layout}:latest", f"docker-archive:{archive}:example/bb:v1"],
        check=True, capture_output=True,
    )
    archived = store.import_path(archive)  # name comes from RepoTags (docker.io/example/bb:v1)
    assert archived.id == oci_image.id
    assert archived.tags == ["bb:oci", "example/bb:v1"]
    # "docker save | gzip" output, which skopeo 1.9 cannot read by itself.
    compressed = tmp_path / "bb.tar.gz"
    compressed.write_bytes(gzip.compress(archive.read_bytes()))
    assert store.import_path(compressed, "bb:gz").id == oci_image.id


def test_oci_layout_without_name_needs_one(store: ImageStore, busybox_layout: Path) -> None:
    # umoci records only the tag ("latest") in ref.name: there is no repository name.
    with pytest.raises(ImageError, match="--name"):
        store.import_path(busybox_layout)


def test_multi_image_layout_is_chosen_by_tag(store: ImageStore, layout_copy: Path) -> None:
    add_layer(layout_copy, "latest", lambda root: (root / "marker").write_text("v2"), new_tag="v2")
    with pytest.raises(ImageError, match="holds 2 images"):
        store.import_path(layout_copy)
    image = store.import_path(layout_copy, "mine:v2")
    assert "marker" in names_in(image.disk_path, "/")
    base = store.import_path(layout_copy, "mine:latest")
    assert base.id != image.id and "marker" not in names_in(base.disk_path, "/")


# ------------------------------------------------------------------ whiteouts


def test_whiteouts_and_opaque_dirs_hide_lower_files(store: ImageStore, layout_copy: Path) -> None:
    def lower(root: Path) -> None:
        (root / "data").mkdir()
        (root / "data/a").write_text("a")
        (root / "data/b").write_text("b")

    add_layer(layout_copy, "latest", lower)
    add_layer(layout_copy, "latest", lambda root: (root / "etc/hostname").unlink())  # umoci writes .wh.hostname
    append_raw_layer(
        layout_copy,
        "latest",
        [
            entry("data", tarfile.DIRTYPE, mode=0o755),
            entry("data/.wh..wh..opq", data=b""),
            entry("data/c", data=b"c"),
        ],
    )
    image = store.import_path(layout_copy, "whiteouts")
    assert len(image.layers) == 4
    assert names_in(image.disk_path, "/data") == {"c"}
    assert "hostname" not in names_in(image.disk_path, "/etc")
    assert "passwd" in names_in(image.disk_path, "/etc")


# ------------------------------------------------------------------ hostile layers


HOSTILE = {
    "dotdot": ([[entry("../evil")]], "../evil", "'..' component"),
    "absolute": ([[entry("/etc/evil")]], "/etc/evil", "absolute path"),
    "symlink-then-write": (
        [[entry("link", tarfile.SYMTYPE, link="@OUTSIDE@"), entry("link/file")]],
        "link/file",
        "created as a symlink",
    ),
    "symlink-in-lower-layer": (
        [[entry("link", tarfile.SYMTYPE, link="@OUTSIDE@")], [entry("link/file")]],
        "link/file",
        "created as a symlink",
    ),
    "hardlink-escape": ([[entry("h", tarfile.LNKTYPE, link="../../etc/passwd")]], "../../etc/passwd", "'..' component"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused(case: str, store: ImageStore, tmp_path: Path, systmp: Path) -> None:
    layers, named, why = HOSTILE[case]
    outside = tmp_path / "outside"
    for layer in layers:
        for info, _ in layer:
            info.linkname = info.linkname.replace("@OUTSIDE@", str(outside))
    archive = make_docker_archive(tmp_path / "evil.tar", layers, "evil/img:latest")

    with pytest.raises(ImageError) as err:
        store.import_path(archive)

    message = str(err.value)
    assert repr(named) in message and why in message
    # The layer is named by its diff_id: the digest of the layer.tar inside the archive.
    assert f"layer sha256:{sha256(tar_bytes(layers[-1]))}" in message
    assert not outside.exists()
    assert not Path("/etc/evil").exists()
    assert not [p for p in tmp_path.rglob("*evil") if p.name == "evil"]
    assert image_dirs(store) == []
    assert not (store.root / "index.json").exists()
    assert list((store.root / ".staging").iterdir()) == []
    assert list(systmp.iterdir()) == []


def test_absolute_symlink_targets_and_devices_are_allowed(store: ImageStore, tmp_path: Path) -> None:
    dev = tarfile.TarInfo("dev/null")
    dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
    archive = make_docker_archive(
        tmp_path / "ok.tar",
        [[
            entry("bin", tarfile.DIRTYPE, mode=0o755),
            entry("bin/sh", tarfile.SYMTYPE, link="/bin/busybox"),
            entry("dev", tarfile.DIRTYPE, mode=0o755),
            (dev, None),
            # A symlink replaced by a real directory may be written through afterwards.
            entry("x", tarfile.SYMTYPE, link="/etc"),
        ], [
            entry("x", tarfile.DIRTYPE, mode=0o755),
            entry("x/file"),
        ]],
        "ok/img:1",
    )
    image = store.import_path(archive)
    assert "/bin/busybox" in debugfs(image.disk_path, "stat /bin/sh")
    assert "character special" in debugfs(image.disk_path, "stat /dev/null")
    assert names_in(image.disk_path, "/x") == {"file"}


def test_zstd_layers_are_scanned_and_imported(store: ImageStore, layout_copy: Path, tmp_path: Path) -> None:
    # umoci 0.4.7 cannot unpack zstd; the import has skopeo recompress such layers to gzip.
    append_raw_layer(layout_copy, "latest", [entry("zfile", data=b"z")], compression="zstd")
    image = store.import_path(layout_copy, "zstd")
    assert "zfile" in names_in(image.disk_path, "/")

    hostile = tmp_path / "hostile.tar.zst"
    hostile.write_bytes(zstd_compress(tar_bytes([entry("a/../../zevil")])))
    with pytest.raises(ImageError, match=r"layer sha256:feed entry 'a/\.\./\.\./zevil' contains a '\.\.'"):
        LayerScanner().scan(hostile, "sha256:feed")


# ------------------------------------------------------------------ malformed input


def test_directory_without_index_is_refused(store: ImageStore, tmp_path: Path, systmp: Path) -> None:
    d = tmp_path / "notalayout"
    d.mkdir()
    (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    with pytest.raises(ImageError, match="index.json is missing"):
        store.import_path(d, "x")
    (d / "index.json").write_text("{not json")
    with pytest.raises(ImageError, match="index.json is not valid JSON"):
        store.import_path(d, "x")
    (d / "oci-layout").unlink()
    with pytest.raises(ImageError, match="oci-layout file is missing"):
        store.import_path(d, "x")
    assert image_dirs(store) == [] and list(systmp.iterdir()) == []


def test_truncated_tarball_is_refused(store: ImageStore, busybox_layout: Path, tmp_path: Path, systmp: Path) -> None:
    archive = tmp_path / "bb.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{busybox_layout}:latest", f"docker-archive:{archive}:bb:1"],
        check=True, capture_output=True,
    )
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated"):
        store.import_path(truncated)
    assert image_dirs(store) == [] and list(systmp.iterdir()) == []


def test_corrupted_blob_is_refused(store: ImageStore, layout_copy: Path, systmp: Path) -> None:
    blob = max((layout_copy / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="Digest did not match"):
        store.import_path(layout_copy, "x")
    assert image_dirs(store) == [] and list(systmp.iterdir()) == []


def test_pull_failure_names_the_reference(store: ImageStore) -> None:
    with pytest.raises(ImageError, match=r"cannot pull 127\.0\.0\.1:1/nothing: .*connection refused"):
        store.pull("127.0.0.1:1/nothing")


# ------------------------------------------------------------------ lookups, concurrency


def test_ambiguous_id_prefix_names_the_candidates(store: ImageStore) -> None:
    ids = ["abcd" + "1" * 60, "abcd" + "2" * 60]
    for image_id in ids:
        (store.root / image_id).mkdir()
        (store.root / image_id / "image.json").write_text(json.dumps({"id": image_id, "config": {}}))
    with pytest.raises(ImageError, match="ambiguous.*abcd11111111.*abcd22222222"):
        store.get("abcd")
    assert store.get("abcd2").id == ids[1]
    with pytest.raises(ImageNotFound, match='image "abce" not found'):
        store.get("abce")


def test_concurrent_imports_both_succeed(store: ImageStore, busybox_layout: Path, layout_copy: Path) -> None:
    add_layer(layout_copy, "latest", lambda root: (root / "second").write_text("2"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(store.import_path, busybox_layout, "one")
        second = pool.submit(store.import_path, layout_copy, "two")
        a, b = first.result(), second.result()
    assert a.id != b.id
    assert {tuple(i.tags) for i in store.list()} == {("one:latest",), ("two:latest",)}
    assert list((store.root / ".staging").iterdir()) == []


def test_staging_left_by_a_dead_import_is_reaped(store: ImageStore, busybox_layout: Path) -> None:
    import fcntl

    dead = store.root / ".staging" / "import-dead"
    dead.mkdir()
    (dead / "rootfs.ext4").write_bytes(b"half")
    Path(f"{dead}.lock").touch()
    alive = store.root / ".staging" / "import-alive"
    alive.mkdir()
    fd = os.open(f"{alive}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another (live) importer holds its staging dir
        store.import_path(busybox_layout, "bb")
        assert sorted(p.name for p in (store.root / ".staging").iterdir()) == ["import-alive", "import-alive.lock"]
    finally:
        os.close(fd)


def test_only_loopback_registries_are_reached_over_plain_http() -> None:
    from kvmc.images.refs import insecure_registry

    assert insecure_registry("127.0.0.1:5000/team/app:1") and insecure_registry("localhost:5000/app")
    assert insecure_registry("[::1]:5000/app")
    assert not insecure_registry("alpine") and not insecure_registry("quay.io/x/y")
    assert not insecure_registry("10.0.0.1:5000/app") and not insecure_registry("192.168.1.2:5000/app")
