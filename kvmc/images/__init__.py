"""OCI images for kvmc: a local store that turns each image into a read-only ext4 disk.

Modules, one job each:

* ``refs``    - docker-style names (``busybox`` -> ``busybox:latest``, pull references)
* ``layout``  - reading OCI layouts / docker-archive tarballs (which image, name, config)
* ``layers``  - refusing hostile layer tarballs before unpacking
* ``disk``    - sizing and building the ext4 base disk with mke2fs -d
* ``tools``   - running skopeo/umoci/mke2fs with readable errors
* ``model``   - the ``Image``/``ImageConfig`` dataclasses
* ``store``   - ``ImageStore``: import, pull, list, get, tag, remove (process-safe)
* ``builder`` - the default busybox image and the CI helper image, built locally with umoci
"""

from kvmc.images.model import Image, ImageConfig
from kvmc.images.refs import normalize_name, parse_reference, pull_source
from kvmc.images.store import ImageStore, RemoveResult

__all__ = [
    "Image",
    "ImageConfig",
    "ImageStore",
    "RemoveResult",
    "add_layer",
    "build_busybox_image",
    "build_busybox_layout",
    "build_ci_helper_image",
    "normalize_name",
    "parse_reference",
    "pull_source",
]


def __getattr__(name: str):  # noqa: ANN202 - the builder's functions, imported on first use
    """The builder (and the tools it imports) only for the commands that build images: every
    other kvmc call, ``run`` first, is spared importing it."""
    if name in ("add_layer", "build_busybox_image", "build_busybox_layout", "build_ci_helper_image"):
        from kvmc.images import builder

        return getattr(builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
