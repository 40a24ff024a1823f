"""Images: the store's operations with the rules that involve containers (in use)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvmc.space import disk_full_errors
from kvmc.errors import ImageInUse
from kvmc.images import Image, RemoveResult

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
