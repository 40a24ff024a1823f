"""Read image sources just enough to choose what skopeo copies and what the image is called.

skopeo does the copying and digest verification; it does not tell us which of several
images a source holds, which name the source recorded, or (for docker-archive) the exact
config bytes docker hashed for the image id - skopeo re-serialises the config when it
converts to OCI, which would give a docker-archive and an OCI layout of the same image two
different ids. So this module reads ``index.json`` / ``manifest.json`` and blobs itself.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmc.errors import ImageError
from kvmc.images.refs import normalize_name, tag_of
from kvmc.images.tools import run_tool

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
# Metadata documents are small; refuse absurd ones instead of reading them into memory.
MAX_JSON_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class SourceImage:
    """One image chosen in a source: how skopeo addresses it and what the source calls it."""

    skopeo_ref: str
    default_name: str | None
    # The config exactly as the source stores it (docker-archive only); None = take the
    # config blob skopeo wrote, which it copies byte for byte between OCI layouts.
    config_bytes: bytes | None = None


@dataclass(frozen=True)
class LayerBlob:
    digest: str
    media_type: str
    path: Path


@dataclass(frozen=True)
class LayoutImage:
    """The manifest, config and layer blobs of one tagged image in an OCI layout."""

    manifest: dict[str, Any]
    config_bytes: bytes
    layers: list[LayerBlob]


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc


def _read_json_file(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ImageError(f"{what} is larger than {MAX_JSON_BYTES} bytes")
        return _loads(path.read_bytes(), what)
    except FileNotFoundError as exc:
        raise ImageError(f"{what} is missing") from exc
    except OSError as exc:
        raise ImageError(f"cannot read {what}: {exc.strerror}") from exc


def blob_path(layout: Path, digest: str) -> Path:
    """Path of a blob; refuses digests that would escape ``blobs/`` (they are untrusted)."""
    algo, _, hexpart = str(digest).partition(":")
    if not algo.isalnum() or not hexpart.isalnum():
        raise ImageError(f"{layout}: invalid digest {digest!r}")
    return layout / "blobs" / algo / hexpart


def _display_name(ref: str | None) -> str | None:
    """A recorded ref as a store name, or None when it is only a tag (``latest``)."""
    if not ref or "/" not in ref and ":" not in ref:
        # An OCI ref.name of just "v1" names a tag, not a repository.
        return None
    try:
        return normalize_name(ref)
    except ImageError:
        return None


def _name_matches(candidate: str | None, name: str) -> bool:
    if not candidate:
        return False
    if candidate == tag_of(name):
        return True
    try:
        return normalize_name(candidate) == normalize_name(name)
    except ImageError:
        return False


def inspect_oci_layout(path: Path, link: Path, name: str | None) -> SourceImage:
    """Choose the image to import from an OCI layout directory.

    ``link`` is a colon-free symlink to ``path`` for skopeo, whose ``oci:`` transport
    splits ``path:ref`` at the first colon.
    """
    if not (path / "oci-layout").is_file():
        raise ImageError(f"{path} is not an OCI image layout: oci-layout file is missing")
    layout_doc = _read_json_file(path / "oci-layout", f"{path}/oci-layout")
    if not isinstance(layout_doc, dict) or "imageLayoutVersion" not in layout_doc:
        raise ImageError(f"{path}/oci-layout has no imageLayoutVersion")
    index = _read_json_file(path / "index.json", f"{path}/index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{path}/index.json lists no manifests")
    refs = [
        (m.get("annotations") or {}).get(REF_NAME) if isinstance(m, dict) else None
        for m in manifests
    ]
    if name is not None:
        chosen = [i for i, r in enumerate(refs) if _name_matches(r, name)]
        if not chosen and len(manifests) == 1:
            chosen = [0]  # the only image, stored under the name the user gave
    else:
        chosen = [0] if len(manifests) == 1 else []
    if len(chosen) != 1:
        listed = ", ".join(r or "<unnamed>" for r in refs)
        wanted = f"none is named {tag_of(name)!r}" if name else "choose one with --name NAME:TAG"
        raise ImageError(f"{path} holds {len(manifests)} images ({listed}): {wanted}")
    ref = refs[chosen[0]]
    if ref is None and len(manifests) > 1:
        raise ImageError(f"{path}: the chosen manifest has no {REF_NAME} annotation")
    return SourceImage(
        skopeo_ref=f"oci:{link}:{ref}" if ref else f"oci:{link}",
        default_name=_display_name(ref),
    )


def inspect_docker_archive(path: Path, link: Path, name: str | None, *, shown: Path | None = None) -> SourceImage:
    """Choose the image to import from a ``docker save`` tarball and read its config.

    ``shown`` is the path to name in errors when ``path`` is a decompressed copy.
    """
    label = shown or path
    try:
        with tarfile.open(path, "r:*") as tar:
            manifest = _loads(_tar_member(tar, "manifest.json", label), f"{label}: manifest.json")
            if not isinstance(manifest, list) or not manifest:
                raise ImageError(f"{label}: manifest.json lists no images")
            repo_tags = [
                [t for t in (e.get("RepoTags") or []) if isinstance(t, str)]
                if isinstance(e, dict)
                else []
                for e in manifest
            ]
            if name is not None:
                chosen = [i for i, tags in enumerate(repo_tags) if any(_name_matches(t, name) for t in tags)]
                if not chosen and len(manifest) == 1:
                    chosen = [0]
            else:
                chosen = [0] if len(manifest) == 1 else []
            if len(chosen) != 1:
                listed = ", ".join(",".join(t) or "<untagged>" for t in repo_tags)
                raise ImageError(
                    f"{label} holds {len(manifest)} images ({listed}): choose one with --name NAME:TAG"
                )
            entry = manifest[chosen[0]]
            config_name = entry.get("Config") if isinstance(entry, dict) else None
            if not isinstance(config_name, str):
                raise ImageError(f"{label}: manifest.json entry has no Config")
            config_bytes = _tar_member(tar, config_name, label)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        detail = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
        raise ImageError(
            f"{label} is not a readable docker-archive tarball (truncated or not a tar file): {detail}"
        ) from exc
    tags = repo_tags[chosen[0]]
    if name is not None:
        matching = [t for t in tags if _name_matches(t, name)]
        tags = matching or tags
    return SourceImage(
        # "@N" selects by position; by name would need the colon-laden ref in the argument.
        skopeo_ref=f"docker-archive:{link}:@{chosen[0]}",
        default_name=_display_name(tags[0]) if tags else None,
        config_bytes=config_bytes,
    )


def decompress_archive(path: Path, dest: Path) -> Path | None:
    """Decompress a gzip/zstd ``docker save`` tarball into ``dest``; None if it is plain.

    skopeo 1.9's docker-archive transport reads only uncompressed tarballs ("archive/tar:
    invalid tar header"), yet ``docker save | gzip`` is how they are usually shipped.
    """
    with path.open("rb") as f:
        magic = f.read(4)
        if magic[:2] == b"\x1f\x8b":
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as gz, dest.open("wb") as out:
                    shutil.copyfileobj(gz, out, 1024 * 1024)
            except (OSError, EOFError, zlib.error) as exc:
                raise ImageError(f"{path} is a corrupt or truncated gzip file: {exc}") from exc
            return dest
    if magic == b"\x28\xb5\x2f\xfd":
        run_tool(["zstd", "-dqf", "-o", str(dest), "--", str(path)], what=f"cannot decompress {path}")
        return dest
    return None


def _tar_member(tar: tarfile.TarFile, member: str, path: Path) -> bytes:
    try:
        info = tar.getmember(member)
    except KeyError as exc:
        raise ImageError(f"{path}: {member} is missing from the tarball") from exc
    if not info.isfile() or info.size > MAX_JSON_BYTES:
        raise ImageError(f"{path}: {member} is not a regular file of sane size")
    f = tar.extractfile(info)
    if f is None:
        raise ImageError(f"{path}: cannot read {member}")
    data = f.read()
    if len(data) != info.size:
        raise ImageError(f"{path}: {member} is truncated")
    return data


def read_layout_image(layout: Path, ref: str) -> LayoutImage:
    """Manifest, config bytes and layer blobs of ``layout:ref`` (a layout skopeo wrote)."""
    index = _read_json_file(layout / "index.json", "copied index.json")
    desc = next(
        (
            m
            for m in index.get("manifests", [])
            if (m.get("annotations") or {}).get(REF_NAME) == ref
        ),
        None,
    )
    if desc is None:
        raise ImageError(f"copied layout has no image {ref!r}")
    manifest = _read_json_file(blob_path(layout, desc["digest"]), "image manifest")
    if not isinstance(manifest, dict) or manifest.get("mediaType", desc.get("mediaType")) not in MANIFEST_TYPES:
        raise ImageError("the image manifest is not an OCI/docker image manifest")
    config_desc = manifest.get("config") or {}
    config_path = blob_path(layout, config_desc.get("digest", ""))
    try:
        config_bytes = config_path.read_bytes()
    except OSError as exc:
        raise ImageError(f"image config blob {config_desc.get('digest')} is missing") from exc
    layers = [
        LayerBlob(digest=d["digest"], media_type=d.get("mediaType", ""), path=blob_path(layout, d["digest"]))
        for d in manifest.get("layers") or []
    ]
    return LayoutImage(manifest=manifest, config_bytes=config_bytes, layers=layers)


def config_digest(config_bytes: bytes) -> str:
    """Image id: hex sha256 of the config blob, as docker computes it."""
    return hashlib.sha256(config_bytes).hexdigest()


def parse_config(config_bytes: bytes) -> dict[str, Any]:
    """The image config as a dict, or ImageError when it is not a JSON object."""
    config = _loads(config_bytes, "image config")
    if not isinstance(config, dict):
        raise ImageError("image config is not a JSON object")
    return config


__all__ = [
    "LayerBlob",
    "LayoutImage",
    "SourceImage",
    "blob_path",
    "config_digest",
    "inspect_docker_archive",
    "inspect_oci_layout",
    "parse_config",
    "read_layout_image",
]
