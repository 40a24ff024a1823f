"""The local image store: import/pull images, turn them into ext4 base disks, look them up.

Layout under ``root`` (nothing is written elsewhere except a private scratch dir in the
system tmp dir, removed on success and failure alike)::

    root/.lock                  fcntl lock serialising every mutation
    root/index.json             {"version": 1, "tags": {"busybox:latest": "<id>"}} - the
                                only record of tags, so a tag can never point two ways
    root/.staging/<rand>/       an import in progress (flock'ed by its owner while alive)
    root/<id>/image.json        immutable metadata (id, created, layers, config, sizes)
    root/<id>/config.json       the image config blob, byte for byte (sha256 == id)
    root/<id>/rootfs.ext4       read-only base disk

An import does the slow work (copy, scan, unpack, mke2fs) without the lock, in scratch
and staging dirs, then takes the lock only to rename the staging dir into place and
update the index, so concurrent kvmc processes neither block each other for long nor
ever see half an image. Files are replaced atomically (temp file + fsync + rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmc.errors import ImageError, ImageNotFound
from kvmc.images.disk import make_ext4
from kvmc.images.layers import scan_layers
from kvmc.images.model import Image, ImageConfig
from kvmc.images.refs import insecure_registry, normalize_name, parse_reference, pull_source
from kvmc.images.tools import run_tool, skopeo_copy, umoci_args

if TYPE_CHECKING:
    from kvmc.images import layout as oci

INDEX_VERSION = 1
SCRATCH_TAG = "kvmc"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"(?:sha256:)?([0-9a-f]{4,64})")
NOT_FOUND_HINT = 'import it with "kvmc image import" or build the default with "kvmc image build-default"'


@dataclass
class RemoveResult:
    """What ``remove`` did, docker-style: tags removed and the image deleted (if it was)."""

    untagged: list[str] = field(default_factory=list)
    deleted: str | None = None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` so readers see the old or the new content, never a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class ImageStore:
    """Images kept under ``root`` (e.g. /var/lib/kvmc/images); safe across processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._staging = self.root / ".staging"
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(f"cannot use image store {self.root}: {exc.strerror}") from exc

    # ---------------------------------------------------------------- locking / index

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive store lock. flock (not lockf) so that threads of one process exclude
        each other too: flock locks belong to the open file, lockf locks to the process."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_tags(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ImageError(f"image store index {self.root / 'index.json'} is unreadable: {exc}") from exc
        tags = data.get("tags") if isinstance(data, dict) else None
        return dict(tags) if isinstance(tags, dict) else {}

    def _write_tags(self, tags: dict[str, str]) -> None:
        _write_atomic(self.root / "index.json", _json_bytes({"version": INDEX_VERSION, "tags": tags}))

    def _image_ids(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if _HEX64.fullmatch(p.name) and (p / "image.json").is_file()
        )

    def _load(self, image_id: str, tags: dict[str, str]) -> Image:
        d = self.root / image_id
        try:
            meta = json.loads((d / "image.json").read_bytes())
        except FileNotFoundError as exc:
            raise ImageNotFound(f'image "{image_id[:12]}" not found (removed meanwhile)', hint=NOT_FOUND_HINT) from exc
        except (OSError, ValueError) as exc:
            raise ImageError(f"metadata of image {image_id[:12]} is unreadable: {exc}") from exc
        return Image(
            id=image_id,
            tags=sorted(t for t, i in tags.items() if i == image_id),
            created=meta.get("created"),
            size=int(meta.get("size", 0)),
            disk_size=int(meta.get("disk_size", 0)),
            disk_path=d / "rootfs.ext4",
            config=ImageConfig.from_dict(meta.get("config") or {}),
            architecture=meta.get("architecture", ""),
            os=meta.get("os", ""),
            layers=list(meta.get("layers") or []),
        )

    # ---------------------------------------------------------------- lookups

    def list(self) -> list[Image]:
        """All images, newest first (untagged ones included, with ``tags == []``)."""
        tags = self._read_tags()
        images = []
        for image_id in self._image_ids():
            with contextlib.suppress(ImageNotFound):
                images.append(self._load(image_id, tags))
        images.sort(key=lambda im: (im.created or "", im.id), reverse=True)
        return images

    def _resolve(self, ref: str, tags: dict[str, str]) -> tuple[str, str | None]:
        """``(id, tag)`` for a reference; ``tag`` is set when ``ref`` named a tag."""
        ids = self._image_ids()
        if ref in ids:
            return ref, None
        if not ref.startswith("sha256:"):
            try:
                name = normalize_name(ref)
            except ImageError:
                name = None
            if name is not None and name in tags and tags[name] in ids:
                return tags[name], name
        m = _HEX_PREFIX.fullmatch(ref)
        if m:
            matches = [i for i in ids if i.startswith(m.group(1))]
            if len(matches) == 1:
                return matches[0], None
            if len(matches) > 1:
                raise ImageError(
                    f'image id prefix "{ref}" is ambiguous: it matches '
                    + ", ".join(i[:12] for i in matches)
                )
        shown = ref
        with contextlib.suppress(ImageError):
            if not m:
                shown = normalize_name(ref)
        raise ImageNotFound(f'image "{shown}" not found: {NOT_FOUND_HINT}')

    def get(self, ref: str) -> Image:
        """Image by ``name[:tag]``, full or ``sha256:`` id, or an unambiguous id prefix (>= 4 hex)."""
        tags = self._read_tags()
        image_id, _ = self._resolve(ref, tags)
        return self._load(image_id, tags)

    # ---------------------------------------------------------------- tags / removal

    def tag(self, ref: str, new_name: str) -> Image:
        """Point ``new_name`` at the image ``ref`` names (moving it off any other image)."""
        name = normalize_name(new_name)
        with self._locked():
            tags = self._read_tags()
            image_id, _ = self._resolve(ref, tags)
            tags[name] = image_id
            self._write_tags(tags)
            return self._load(image_id, tags)

    def remove(self, ref: str, force: bool = False) -> RemoveResult:
        """Untag ``ref``; delete the image when no tag is left.

        By id, an image with several tags is refused unless ``force`` (then all its tags
        go), as docker does. The caller must make sure no container uses the image: its
        overlays reference ``rootfs.ext4`` by path.
        """
        result = RemoveResult()
        with self._locked():
            tags = self._read_tags()
            image_id, tag = self._resolve(ref, tags)
            own = sorted(t for t, i in tags.items() if i == image_id)
            if tag is not None:
                doomed = [tag]
            elif len(own) > 1 and not force:
                raise ImageError(
                    f"image {image_id[:12]} is referenced by several tags ({', '.join(own)}): "
                    "remove them by name, or force removal of all of them"
                )
            else:
                doomed = own
            for t in doomed:
                del tags[t]
            self._write_tags(tags)
            result.untagged = doomed
            if not any(i == image_id for i in tags.values()):
                # Rename first so a crash mid-delete never leaves a half image visible.
                trash = Path(tempfile.mkdtemp(dir=self._staging, prefix="trash-"))
                os.rename(self.root / image_id, trash / image_id)
                result.deleted = image_id
        if result.deleted:
            shutil.rmtree(trash, ignore_errors=True)
        return result

    # ---------------------------------------------------------------- import / pull

    def import_path(self, path: Path, name: str | None = None) -> Image:
        """Import an OCI layout directory or a ``docker save`` tarball.

        ``name`` picks the image in a multi-image source and is the tag to store it under;
        without it the source's recorded name is used.
        """
        from kvmc.images import layout as oci  # here: hashlib and tarfile are not every command's

        path = Path(path)
        if not path.exists():
            raise ImageError(f"{path} does not exist")
        wanted = normalize_name(name) if name is not None else None
        with self._scratch() as scratch:
            link = scratch / "src"
            link.symlink_to(path.absolute())
            if path.is_dir():
                source = oci.inspect_oci_layout(path, link, wanted)
            elif path.is_file():
                plain = oci.decompress_archive(path, scratch / "archive.tar")
                if plain is not None:
                    link.unlink()
                    link.symlink_to(plain)
                source = oci.inspect_docker_archive(plain or path, link, wanted, shown=path)
            else:
                raise ImageError(f"{path} is neither an OCI layout directory nor a docker-archive tarball")
            final = wanted or source.default_name
            if final is None:
                raise ImageError(
                    f"{path} does not record an image name", hint="give one with --name NAME[:TAG]"
                )
            return self._import_source(source, final, scratch, what=f"cannot import {path}")

    def pull(self, ref: str, timeout: float | None = None) -> Image:
        """Pull ``ref`` from its registry (``alpine`` means docker.io/library/alpine:latest)."""
        from kvmc.images import layout as oci  # here: hashlib and tarfile are not every command's

        parsed = parse_reference(ref)
        name = None if parsed.digest and not parsed.tag else parsed.familiar()
        with self._scratch() as scratch:
            source = oci.SourceImage(skopeo_ref=pull_source(ref), default_name=name)
            return self._import_source(source, name, scratch, what=f"cannot pull {ref}", timeout=timeout,
                                       tls_verify=not insecure_registry(ref))

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        d = Path(tempfile.mkdtemp(prefix="kvmc-import-"))  # mode 0700
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _import_source(
        self,
        source: oci.SourceImage,
        name: str | None,
        scratch: Path,
        *,
        what: str,
        timeout: float | None = None,
        tls_verify: bool = True,
    ) -> Image:
        from kvmc.images import layout as oci  # here: hashlib and tarfile are not every command's

        copied = scratch / "layout"
        skopeo_copy(source.skopeo_ref, f"oci:{copied}:{SCRATCH_TAG}", what=what, scratch=scratch, timeout=timeout,
                    source_tls_verify=tls_verify)
        img = oci.read_layout_image(copied, SCRATCH_TAG)
        config_bytes = source.config_bytes if source.config_bytes is not None else img.config_bytes
        config = oci.parse_config(config_bytes)
        image_id = oci.config_digest(config_bytes)
        if source.config_bytes is not None:
            copied_config = oci.parse_config(img.config_bytes)
            if (copied_config.get("rootfs") or {}).get("diff_ids") != (config.get("rootfs") or {}).get("diff_ids"):
                # The id and metadata come from the source's config; make sure it is the
                # config of the layers skopeo copied (and we are about to unpack).
                raise ImageError(f"{what}: the archive's config does not describe the copied layers")
        if config.get("os", "linux") != "linux":
            raise ImageError(f"{what}: image is for {config.get('os')!r}, kvmc runs linux images only")

        if (self.root / image_id / "image.json").is_file():
            return self._add_tag(image_id, name)

        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        # Name layers by diff_id (digest of the uncompressed tar) when we can: it is what
        # the source shows (docker-archive file names, the config); the blob digest in our
        # scratch copy may be skopeo's own recompression, which the user never saw.
        if len(diff_ids) == len(img.layers):
            names = [str(d) for d in diff_ids]
        else:
            names = [layer.digest for layer in img.layers]
        scan_layers([(layer.path, label) for layer, label in zip(img.layers, names, strict=True)])

        rootfs = scratch / "rootfs"
        # "raw unpack": just the rootfs, no runtime bundle and no mtree manifest (umoci
        # would hash every file for a repack we never do). Whiteouts are applied by umoci.
        run_tool(umoci_args(("raw", "unpack"), "--image", f"{copied}:{SCRATCH_TAG}", str(rootfs)), what=what,
                 writes=(scratch,))
        shutil.rmtree(copied)  # free the blobs before the disk is written

        with self._staging_dir() as staging:
            disk = make_ext4(rootfs, staging / "rootfs.ext4")
            shutil.rmtree(rootfs)
            meta = {
                "id": image_id,
                "created": config.get("created"),
                "architecture": config.get("architecture", ""),
                "os": config.get("os", ""),
                "layers": [str(d) for d in diff_ids],
                "config": ImageConfig.from_oci(config).to_dict(),
                "size": disk.content_size,
                "disk_size": disk.disk_size,
            }
            _write_atomic(staging / "config.json", config_bytes, 0o444)
            _write_atomic(staging / "image.json", _json_bytes(meta))
            with self._locked():
                target = self.root / image_id
                if not (target / "image.json").is_file():
                    if target.exists():  # debris of an interrupted removal
                        shutil.rmtree(target)
                    os.rename(staging, target)
        return self._add_tag(image_id, name)

    def _add_tag(self, image_id: str, name: str | None) -> Image:
        with self._locked():
            tags = self._read_tags()
            if name is not None and tags.get(name) != image_id:
                tags[name] = image_id
                self._write_tags(tags)
            return self._load(image_id, tags)

    @contextlib.contextmanager
    def _staging_dir(self) -> Iterator[Path]:
        """A dir inside root (same file system, so it can be renamed into place), held
        under flock while in use; dirs whose owner died are reaped by the next import."""
        with self._locked():
            self._reap_staging()
            d = Path(tempfile.mkdtemp(dir=self._staging, prefix="import-"))
            # mkdtemp makes it 0700; QEMU runs as another user and must reach the disk.
            os.chmod(d, 0o755)
            fd = os.open(f"{d}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{d}.lock")
            os.close(fd)

    def _reap_staging(self) -> None:
        """Remove staging/trash dirs left by crashed processes (called under the store lock)."""
        for entry in self._staging.iterdir():
            if entry.suffix == ".lock":
                if not entry.with_suffix("").exists():  # owner finished or died mid-cleanup
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                continue
            lock = Path(f"{entry}.lock")
            if entry.name.startswith("import-") and lock.exists():
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner is still working
                finally:
                    os.close(fd)
            # Import dirs without a lock file can only come from a crash between mkdtemp
            # and open (both happen under the store lock we hold); trash dirs are garbage.
            shutil.rmtree(entry, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
