"""Image names: parse docker-style references and normalise them for the store.

The store keys images by their *familiar* name (``busybox:latest``, ``foo/bar:v1``,
``ghcr.io/x/y:1``) so that what the user typed, what ``docker save`` recorded
(``docker.io/library/busybox:latest``) and what ``kvmc image ls`` prints all agree.
Only ``pull`` needs the fully qualified form that skopeo's ``docker://`` transport wants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmc.errors import ImageError

DEFAULT_TAG = "latest"
DOCKER_HUB = "docker.io"
# Aliases of Docker Hub that docker itself folds into the familiar form.
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# Grammar from github.com/distribution/reference (lower-case path components).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference; ``domain`` is None for Docker Hub."""

    domain: str | None
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """Familiar repository name: ``alpine``, ``foo/bar``, ``ghcr.io/x/y``."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def familiar(self) -> str:
        """The store's key for this reference: ``repository:tag`` (tag defaults to latest)."""
        return f"{self.repository}:{self.tag or DEFAULT_TAG}"

    def remote(self) -> str:
        """Fully qualified form for registries: ``docker.io/library/alpine:latest``."""
        domain = self.domain or DOCKER_HUB
        path = self.path
        if domain == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if self.digest:
            suffix = (f":{self.tag}" if self.tag else "") + f"@{self.digest}"
        else:
            suffix = f":{self.tag or DEFAULT_TAG}"
        return f"{domain}/{path}{suffix}"


def parse_reference(text: str) -> Reference:
    """Parse ``[domain/]path[:tag][@digest]``; raise ImageError naming what is wrong."""
    original = text
    if not text or text != text.strip():
        raise ImageError(f"invalid image name {original!r}: empty or surrounded by spaces")
    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ImageError(f"invalid image name {original!r}: bad digest {digest!r}")
    tag: str | None = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ImageError(f"invalid image name {original!r}: bad tag {tag!r}")
    parts = text.split("/")
    domain: str | None = None
    # Docker's rule: the first component is a registry when it looks like a host name.
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        domain = parts.pop(0)
        if not _DOMAIN.fullmatch(domain):
            raise ImageError(f"invalid image name {original!r}: bad registry {domain!r}")
    for part in parts:
        if not _COMPONENT.fullmatch(part):
            raise ImageError(
                f"invalid image name {original!r}: repository names must be lower case "
                "letters, digits and separators (. _ __ -)"
            )
    path = "/".join(parts)
    if domain in _HUB_ALIASES:
        domain = None
    if domain is None and path.startswith("library/") and path.count("/") == 1:
        path = path[len("library/") :]  # docker.io/library/alpine, library/alpine: alpine
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def normalize_name(text: str) -> str:
    """Store key for a tag name: ``busybox`` -> ``busybox:latest``; digests are refused."""
    ref = parse_reference(text)
    if ref.digest:
        raise ImageError(f"invalid image name {text!r}: a digest cannot be used as a tag name")
    return ref.familiar()


def tag_of(name: str) -> str:
    """The tag part of a name (``latest`` when none is given)."""
    return parse_reference(name).tag or DEFAULT_TAG


def insecure_registry(text: str) -> bool:
    """docker's default insecure registries: a registry on this host's loopback (127.0.0.0/8,
    ::1, localhost) is reached over plain HTTP; every other one over verified TLS."""
    from kvmc.network import is_loopback_host

    domain = parse_reference(text).domain or ""
    host = domain.rsplit(":", 1)[0].strip("[]") if domain.count(":") <= 1 else domain.strip("[]").rsplit("]:", 1)[0]
    return is_loopback_host(host)


def pull_source(text: str) -> str:
    """skopeo source for ``pull``: ``alpine`` -> ``docker://docker.io/library/alpine:latest``."""
    return "docker://" + parse_reference(text).remote()
