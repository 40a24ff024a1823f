"""Images: the store's operations with the rules that involve containers (in use)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from kvmc.space import disk_full_errors
from kvmc.errors import ImageInUse, KvmcError
from kvmc.images import Image, RemoveResult, normalize_name
from kvmc.images.tools import run_tool

if TYPE_CHECKING:
    from kvmc.runtime import Runtime


@disk_full_errors(lambda self: self.engine.config.data_dir)
class ImageService:
    """Images for both front doors."""

    def __init__(self, engine: Runtime) -> None:
        self.engine = engine
        self.store = engine.images

    def list(self) -> list[Image]:
        return self.store.list()

    def get(self, ref: str) -> Image:
        return self.store.get(ref)

    def pull(self, ref: str) -> Image:
        """From a registry, with skopeo (``alpine`` means docker.io/library/alpine:latest)."""
        return self.store.pull(ref)

    def import_path(self, path: Path, name: str | None = None) -> Image:
        """An OCI layout directory or a ``docker save`` tarball."""
        return self.store.import_path(path, name)

    def build_default(self, name: str) -> Image:
        """kvmc's default image, from the host's busybox-static (no registry needed)."""
        from kvmc.images import build_busybox_image

        return build_busybox_image(self.store, name)

    def build_ci_helper(self, name: str) -> Image:
        """The helper image of gitlab-ci-local's docker executor (busybox, bash, rsync)."""
        from kvmc.images import build_ci_helper_image

        return build_ci_helper_image(self.store, name)

    def tag(self, ref: str, new_name: str) -> Image:
        return self.store.tag(ref, new_name)

    def users(self, image: Image) -> list[str]:
        """Containers whose disks back onto the image."""
        return self.engine.containers_using_image(image.id)

    def remove(self, ref: str, force: bool = False) -> RemoveResult:
        """Untag ``ref``; delete the image when no tag is left. An image whose disk a
        container's overlay still backs onto is refused (even with ``force``: the overlay
        would lose its base); untagging one of several tags deletes nothing, so it is allowed
        (as in docker)."""
        image = self.store.get(ref)
        untag_only = (ref in image.tags or f"{ref}:latest" in image.tags) and len(image.tags) > 1
        if not untag_only:
            users = self.users(image)
            if users:
                raise ImageInUse(f'image "{ref}" is used by container(s) {", ".join(users)}: remove them first')
        return self.store.remove(ref, force=force)

    def prune(self, all_images: bool = True) -> list[str]:
        """Delete every image no container uses (``all_images``) or only untagged ones; their ids."""
        used = {r.image_id for r in self.engine.state.list()}
        deleted = []
        for image in self.store.list():
            if image.id not in used and (all_images or not image.tags):
                self.store.remove(image.id, force=True)
                deleted.append(image.id)
        return deleted

    def save(self, refs: list[str], out: BinaryIO) -> None:
        """``docker save``: a docker-archive tarball of the images, one layer each.

        kvmc keeps an image as its config and an ext4 disk, not as layers, so the layer is the
        disk's whole tree, dumped with e2fsprogs' debugfs (this is the disk kvmc itself built
        from the image's layers, read-only to every guest: no guest-written data is parsed),
        and the config's rootfs names that one layer. ``docker load`` (of kvmc or dockerd)
        reads it back as the same files, config and tags.
        """
        images = [self.store.get(ref) for ref in refs]
        with tempfile.TemporaryDirectory(prefix="kvmc-save-") as scratch:
            manifest, repositories = [], {}
            with tarfile.open(fileobj=out, mode="w|") as archive:
                for image in images:
                    tree = Path(scratch) / image.id
                    tree.mkdir()
                    run_tool(["debugfs", "-R", f"rdump / {tree}", str(image.disk_path)],
                             what=f"cannot read image {image.short_id}'s disk")
                    shutil.rmtree(tree / "lost+found", ignore_errors=True)  # mkfs's, not the image's
                    layer = Path(scratch) / f"{image.id}.tar"
                    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
                        for child in sorted(tree.iterdir()):
                            tar.add(child, arcname=child.name)
                    digest = hashlib.sha256(layer.read_bytes()).hexdigest()
                    config = json.loads((image.disk_path.parent / "config.json").read_text())
                    config["rootfs"] = {"type": "layers", "diff_ids": [f"sha256:{digest}"]}
                    config.pop("history", None)
                    config_bytes = json.dumps(config).encode()
                    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
                    _add_bytes(archive, config_name, config_bytes)
                    archive.add(layer, arcname=f"{digest}/layer.tar")
                    tags = [t for t in image.tags if any(t == normalize_name(r) for r in refs if _is_name(r))]
                    manifest.append({"Config": config_name, "RepoTags": tags or list(image.tags),
                                     "Layers": [f"{digest}/layer.tar"]})
                    for tag in tags or image.tags:
                        repo, _, version = tag.rpartition(":")
                        repositories.setdefault(repo, {})[version] = digest
                _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
                _add_bytes(archive, "repositories", json.dumps(repositories).encode())


def _is_name(ref: str) -> bool:
    try:
        normalize_name(ref)
        return True
    except KvmcError:
        return False


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))
