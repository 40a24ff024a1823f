"""Docker Engine API requests in kvmc's terms: pure functions, no I/O.

Docker's clients send the full ContainerCreate struct with zero values for everything not
asked for (notes §3.1), so "absent", "null", ``""``, ``0`` and ``[]`` all mean "default"
here. What kvmc cannot do is kept as given (a network name, a restart policy) so the
caller can refuse it with a message that names it, rather than silently dropping it.

The output strings are kvmc's own CLI syntax (``-p``, ``-v``, ``--tmpfs``), so the service
layer parses them with the same functions as ``kvmc run`` and errors read the same.
"""

from __future__ import annotations

import base64
import json
import math
import re
import signal
import stat
from dataclasses import dataclass, field
from typing import Any

from kvmc.errors import ImageError, UsageError
from kvmc.health import Healthcheck
from kvmc.images.refs import DEFAULT_TAG, parse_reference
from kvmc.options import ContainerOptions, RestartPolicy, Ulimit
from kvmc.process import ProcessOptions
from kvmc.runtime import DockerFields, RunOptions
# Docker's time words live with the views both doors render; imported from here by the routes.
from kvmc.views import ZERO_TIME, format_time, human_duration, human_status, parse_time  # noqa: F401


class InvalidRequest(UsageError, ValueError):
    """The request is malformed: the API answers 400 with this message (kind ``invalid``)."""

    kind = "invalid"


# ---------------------------------------------------------------------------------- images

_HEX_ID = re.compile(r"sha256:[0-9a-f]{4,64}|[0-9a-f]{12,64}")
_DIGEST_TAG = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")


def normalize_image_ref(ref: str) -> str:
    """The store's familiar form: ``docker.io/library/alpine`` -> ``alpine:latest``.

    Ids (``sha256:<hex>``, bare hex of docker's short-id length 12 or more) pass through
    unchanged. A shorter hex string is normalised as a name: it may also be an id prefix,
    which only the store can tell, so look images up with the reference as the client sent
    it (kvmc's store tries the name, then the id prefix, as moby does) and use this form
    for tags and messages (``No such image: alpine:latest``). Digest references keep their
    digest and get no default tag.
    """
    if _HEX_ID.fullmatch(ref):
        return ref
    try:
        parsed = parse_reference(ref)
    except ImageError as exc:
        raise InvalidRequest(f"invalid reference format: {exc}") from None
    repository = _familiar_repository(parsed.repository)
    if parsed.digest:
        tag = f":{parsed.tag}" if parsed.tag else ""
        return f"{repository}{tag}@{parsed.digest}"
    return f"{repository}:{parsed.tag or DEFAULT_TAG}"


def _familiar_repository(repository: str) -> str:
    """Docker Hub's official images drop ``library/`` in their familiar name."""
    if repository.startswith("library/") and repository.count("/") == 1:
        return repository[len("library/"):]
    return repository


def pull_ref(from_image: str, tag: str | None) -> str:
    """``POST /images/create?fromImage=&tag=`` as one normalised reference.

    As in moby: a ``tag`` that is a digest pins the digest, another ``tag`` replaces the
    one in ``fromImage``, and an empty ``tag`` keeps ``fromImage``'s own (``latest`` if none).
    """
    if not from_image:
        raise InvalidRequest("fromImage is required: the image to pull")
    try:
        parsed = parse_reference(from_image)
    except ImageError as exc:
        raise InvalidRequest(f"invalid reference format: {exc}") from None
    tag = (tag or "").strip()
    repository = _familiar_repository(parsed.repository)
    if tag and _DIGEST_TAG.fullmatch(tag):
        return f"{repository}@{tag}"
    if tag:
        return normalize_image_ref(f"{repository}:{tag}")
    return normalize_image_ref(from_image)


# ---------------------------------------------------------------------------------- create

@dataclass
class CreateRequest:
    """What kvmc needs from ``POST /containers/create``, in kvmc's terms.

    ``entrypoint`` and ``cmd`` stay lists (Docker's Entrypoint is a list; ``[]`` or ``[""]``
    mean "reset the image's entrypoint"); None means "the image's". An empty Cmd is None:
    moby uses the image's Cmd for it too. ``publish``, ``volumes`` and
    ``tmpfs`` are kvmc CLI specs (``-p``, ``-v``, ``--tmpfs``).
    """

    image: str
    name: str | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    tty: bool = False
    open_stdin: bool = False
    stdin_once: bool = False
    attach_stdin: bool = False
    attach_stdout: bool = False
    attach_stderr: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    """``80/tcp`` keys of Config.ExposedPorts."""
    stop_signal: str | None = None
    stop_timeout: int | None = None
    auto_remove: bool = False
    memory_mib: int | None = None
    cpus: int | None = None
    network: str = "user"
    """``user`` (docker's default/bridge), ``none``, or any other name as given."""
    network_aliases: list[str] = field(default_factory=list)
    """NetworkingConfig.EndpointsConfig aliases on the NetworkMode network (compose: the
    container and service names)."""
    more_networks: list[tuple[str, list[str]]] = field(default_factory=list)
    """Further EndpointsConfig entries (API 1.44+ creates a container on several networks)."""
    publish: list[str] = field(default_factory=list)
    publish_all: bool = False
    volumes: list[str] = field(default_factory=list)
    anonymous_volumes: list[str] = field(default_factory=list)
    """Container paths of Config.Volumes (and source-less volume Mounts): no name given."""
    tmpfs: list[str] = field(default_factory=list)
    read_only: bool = False
    console_size: tuple[int, int] | None = None
    """(rows, cols) of HostConfig.ConsoleSize; None when not given ([0, 0])."""
    init: bool | None = None
    dns: list[str] = field(default_factory=list)
    extra_hosts: list[str] = field(default_factory=list)
    restart_policy: str = "no"
    log_driver: str | None = None
    """HostConfig.LogConfig.Type; None for the default."""
    log_opts: dict[str, str] = field(default_factory=dict)
    """HostConfig.LogConfig.Config: json-file's max-size and max-file (checked by the engine)."""
    options: ContainerOptions = field(default_factory=ContainerOptions)
    """Restart policy, health check, DNS, hosts, ulimits, capabilities, /dev/shm, exposed ports."""


def _log_opts(value: Any) -> dict[str, str]:
    opts = _obj(value, "HostConfig.LogConfig.Config")
    if not all(isinstance(v, str) for v in opts.values()):
        raise InvalidRequest("invalid HostConfig.LogConfig.Config: values must be strings")
    return dict(opts)


def _obj(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"invalid {what}: expected a JSON object")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"invalid {what}: expected a list of strings")
    return list(value)


def _strslice(value: Any, what: str) -> list[str] | None:
    """Go's strslice.StrSlice: a list, or one string; null means "not set"."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return _str_list(value, what)


def _opt_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _labels(value: Any, what: str = "Labels") -> dict[str, str]:
    labels = _obj(value, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidRequest(f"invalid {what}: keys and values must be strings")
    return dict(labels)


def _nonneg_int(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidRequest(f"invalid {what}: expected a non-negative number")
    return int(value)


def memory_mib(memory_bytes: Any) -> int | None:
    """HostConfig.Memory (bytes) as whole MiB, rounded up; 0 means kvmc's default."""
    value = _nonneg_int(memory_bytes, "HostConfig.Memory")
    return -(-value // (1 << 20)) if value else None


def cpu_count(nano_cpus: Any, cpu_count_value: Any = None) -> int | None:
    """HostConfig.NanoCpus (1.5 CPUs = 1.5e9) as whole vCPUs rounded up, else CpuCount."""
    nano = _nonneg_int(nano_cpus, "HostConfig.NanoCpus")
    if nano:
        return max(1, math.ceil(nano / 1e9))
    count = _nonneg_int(cpu_count_value, "HostConfig.CpuCount")
    return count or None


def network_mode(mode: Any) -> str:
    """Docker's NetworkMode in kvmc's terms: default/bridge are kvmc's user network."""
    text = str(mode or "")
    if text in ("", "default", "bridge"):
        return "user"
    return text


_PORT_KEY = re.compile(r"(\d+)(?:/([a-z]+))?")


def _port_key(key: str) -> tuple[int, str]:
    match = _PORT_KEY.fullmatch(key)
    if not match:
        raise InvalidRequest(f'invalid port "{key}": expected PORT/tcp or PORT/udp')
    proto = match[2] or "tcp"
    if proto not in ("tcp", "udp"):
        raise InvalidRequest(f'invalid port "{key}": kvmc publishes tcp and udp only')
    return int(match[1]), proto


def publish_specs(port_bindings: Any) -> list[str]:
    """HostConfig.PortBindings as kvmc ``-p`` specs.

    ``{"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}`` -> ``8080:80/tcp``; an empty
    HostPort means any free port, which kvmc writes as an empty host port
    (``HOSTIP::80/tcp``, or just ``80/tcp``).
    """
    specs = []
    for key, bindings in sorted(_obj(port_bindings, "HostConfig.PortBindings").items()):
        port, proto = _port_key(key)
        for binding in bindings or []:
            binding = _obj(binding, "HostConfig.PortBindings")
            specs.append(_publish_spec(port, proto, str(binding.get("HostIp") or ""),
                                       str(binding.get("HostPort") or "")))
    return specs


def _publish_spec(port: int, proto: str, host_ip: str, host_port: str) -> str:
    if host_port and not host_port.isdigit():
        raise InvalidRequest(f'invalid host port "{host_port}" for {port}/{proto}: '
                             "kvmc publishes single ports, not ranges")
    if ":" in host_ip:
        host_ip = f"[{host_ip}]"
    if host_ip:
        return f"{host_ip}:{host_port}:{port}/{proto}"
    if host_port:
        return f"{host_port}:{port}/{proto}"
    return f"{port}/{proto}"


_BIND_MODES_DROPPED = frozenset({"rw", "z", "Z", "nocopy", "consistent", "cached", "delegated",
                                 "private", "rprivate", "shared", "rshared", "slave", "rslave"})


def bind_spec(bind: str) -> str:
    """One HostConfig.Binds entry as a kvmc ``-v`` spec: ``src:dst`` or ``src:dst:ro``.

    Docker's other options (``rw``, SELinux ``z``/``Z``, ``nocopy``, propagation) mean
    nothing for a VM's disk or virtiofs share and are dropped.
    """
    parts = bind.split(":")
    if len(parts) < 2 or len(parts) > 3 or not parts[0] or not parts[1]:
        raise InvalidRequest(f'invalid volume specification: "{bind}"')
    source, target = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) == 3 and parts[2] else []
    unknown = [o for o in options if o != "ro" and o not in _BIND_MODES_DROPPED]
    if unknown:
        raise InvalidRequest(f'invalid mode "{",".join(unknown)}" in volume specification "{bind}"')
    return f"{source}:{target}:ro" if "ro" in options else f"{source}:{target}"


def _tmpfs_options(tmpfs: dict[str, Any]) -> str:
    """Mount.TmpfsOptions as ``--tmpfs`` options (size in bytes, mode in octal)."""
    options = []
    size = _nonneg_int(tmpfs.get("SizeBytes"), "TmpfsOptions.SizeBytes")
    if size:
        options.append(f"size={size}")
    mode = _nonneg_int(tmpfs.get("Mode"), "TmpfsOptions.Mode")
    if mode:
        options.append(f"mode={mode:o}")
    return ",".join(options)


def _tmpfs_spec(target: str, options: str) -> str:
    return f"{target}:{options}" if options else target


@dataclass
class _Mounts:
    volumes: list[str] = field(default_factory=list)
    anonymous: list[str] = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)


def _api_mounts(mounts: Any, out: _Mounts) -> None:
    """HostConfig.Mounts (``--mount``, compose, docker-py) into kvmc specs."""
    if mounts is None:
        return
    if not isinstance(mounts, list):
        raise InvalidRequest("invalid HostConfig.Mounts: expected a list")
    for mount in mounts:
        mount = _obj(mount, "HostConfig.Mounts")
        kind = mount.get("Type") or ""
        target = str(mount.get("Target") or mount.get("Destination") or "")
        if not target:
            raise InvalidRequest("invalid mount config: Target is required")
        source = str(mount.get("Source") or "")
        suffix = ":ro" if mount.get("ReadOnly") else ""
        if kind == "volume" and not source:
            out.anonymous.append(target)
        elif kind in ("volume", "bind"):
            if kind == "bind" and not source:
                raise InvalidRequest(f"invalid mount config for type \"bind\": Source is required ({target})")
            out.volumes.append(f"{source}:{target}{suffix}")
        elif kind == "tmpfs":
            out.tmpfs.append(_tmpfs_spec(target, _tmpfs_options(_obj(mount.get("TmpfsOptions"), "TmpfsOptions"))))
        else:
            raise InvalidRequest(f'mount type "{kind}" is not supported by kvmc (volume, bind and tmpfs are)')


def _collect_mounts(config: dict[str, Any], host: dict[str, Any]) -> _Mounts:
    out = _Mounts()
    out.volumes.extend(bind_spec(b) for b in _str_list(host.get("Binds"), "HostConfig.Binds"))
    _api_mounts(host.get("Mounts"), out)
    for target, options in sorted(_obj(host.get("Tmpfs"), "HostConfig.Tmpfs").items()):
        out.tmpfs.append(_tmpfs_spec(target, str(options or "")))
    # Config.Volumes (``-v /anon``, or an image's VOLUME copied by the client) names paths
    # that get an anonymous volume unless something else is mounted there.
    taken = {spec.split(":")[1] for spec in out.volumes} | {spec.split(":")[0] for spec in out.tmpfs}
    for target in sorted(_obj(config.get("Volumes"), "Volumes")):
        if target not in taken and target not in out.anonymous:
            out.anonymous.append(target)
    return out


def console_size(value: Any) -> tuple[int, int] | None:
    """docker's ConsoleSize ``[rows, columns]`` (create's HostConfig, exec create and start);
    None when absent or 0x0."""
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise InvalidRequest("invalid HostConfig.ConsoleSize: expected [rows, columns]")
    return (value[0], value[1]) if any(value) else None


def _user(value: Any) -> str | None:
    """Config.User: ``"1000"``, ``"0:0"``, ``"app"``; docker-py may send an int."""
    if isinstance(value, bool):
        raise InvalidRequest("invalid User: expected a string")
    return _opt_str(value)


def _stop_timeout(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("invalid StopTimeout: expected an integer number of seconds")
    return value


def _endpoints(networking: Any) -> dict[str, list[str]]:
    """NetworkingConfig.EndpointsConfig: each network named, with its aliases (in order)."""
    endpoints = _obj(_obj(networking, "NetworkingConfig").get("EndpointsConfig"), "EndpointsConfig")
    found: dict[str, list[str]] = {}
    for name, endpoint in endpoints.items():
        aliases: list[str] = []
        for alias in _str_list(_obj(endpoint, "EndpointsConfig").get("Aliases"), "Aliases"):
            if alias not in aliases:
                aliases.append(alias)
        found[str(name)] = aliases
    return found


def _network_request(mode: Any, networking: Any) -> tuple[str, list[str], list[tuple[str, list[str]]]]:
    """(network, its aliases, further endpoints) from NetworkMode and EndpointsConfig. A
    NetworkMode of default/bridge with EndpointsConfig naming one network (docker-py's
    ``networking_config`` alone) puts the container on that network."""
    network = network_mode(mode)
    endpoints = _endpoints(networking)
    if network == "user":
        named = [n for n in endpoints if network_mode(n) != "user"]
        if named:
            network = named[0]
    aliases = endpoints.pop(network, [])
    more = [(name, aliases_) for name, aliases_ in endpoints.items() if network_mode(name) != "user"]
    return network, aliases, more


def _ulimits(value: Any) -> list[Ulimit]:
    """HostConfig.Ulimits: ``[{"Name": "nofile", "Soft": 1024, "Hard": 2048}]``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest("invalid HostConfig.Ulimits: expected a list")
    limits = []
    for item in value:
        item = _obj(item, "HostConfig.Ulimits")
        soft, hard = item.get("Soft", 0), item.get("Hard", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (soft, hard)):
            raise InvalidRequest("invalid HostConfig.Ulimits: Soft and Hard are integers")
        limits.append(Ulimit.make(str(item.get("Name") or ""), soft, hard))
    return limits


def _restart(value: Any) -> RestartPolicy:
    policy = _obj(value, "HostConfig.RestartPolicy")
    retries = policy.get("MaximumRetryCount") or 0
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise InvalidRequest("invalid HostConfig.RestartPolicy.MaximumRetryCount: expected an integer")
    return RestartPolicy.make(str(policy.get("Name") or "no"), retries)


def container_options(body: dict[str, Any], host: dict[str, Any]) -> ContainerOptions:
    """The settings of kvmc/options.py from docker's Config and HostConfig."""
    init = host.get("Init")
    shm = _nonneg_int(host.get("ShmSize"), "HostConfig.ShmSize")
    return ContainerOptions(
        restart=_restart(host.get("RestartPolicy")),
        healthcheck=Healthcheck.from_docker(_obj(body.get("Healthcheck"), "Healthcheck")),
        init=init if isinstance(init, bool) else None,
        dns=_str_list(host.get("Dns"), "HostConfig.Dns"),
        dns_search=_str_list(host.get("DnsSearch"), "HostConfig.DnsSearch"),
        dns_options=_str_list(host.get("DnsOptions"), "HostConfig.DnsOptions"),
        extra_hosts=_str_list(host.get("ExtraHosts"), "HostConfig.ExtraHosts"),
        ulimits=_ulimits(host.get("Ulimits")),
        cap_add=_str_list(host.get("CapAdd"), "HostConfig.CapAdd"),
        cap_drop=_str_list(host.get("CapDrop"), "HostConfig.CapDrop"),
        privileged=bool(host.get("Privileged")),
        shm_size=shm or None,
        expose=sorted(_obj(body.get("ExposedPorts"), "ExposedPorts")),
        publish_all=bool(host.get("PublishAllPorts")),
    )


def create_options(body: Any, name: str | None) -> CreateRequest:
    """``POST /containers/create[?name=]`` body as a :class:`CreateRequest`."""
    if not isinstance(body, dict):
        raise InvalidRequest("config cannot be empty in order to create a container")
    host = _obj(body.get("HostConfig"), "HostConfig")
    image = body.get("Image")
    if not image or not isinstance(image, str):
        raise InvalidRequest("no image specified: Config.Image is required")
    mounts = _collect_mounts(body, host)
    restart = _obj(host.get("RestartPolicy"), "HostConfig.RestartPolicy")
    log_config = _obj(host.get("LogConfig"), "HostConfig.LogConfig")
    init = host.get("Init")
    network, network_aliases, more_networks = _network_request(host.get("NetworkMode"), body.get("NetworkingConfig"))
    return CreateRequest(
        image=image,
        name=(name or "").lstrip("/") or None,
        cmd=_strslice(body.get("Cmd"), "Cmd") or None,
        entrypoint=_strslice(body.get("Entrypoint"), "Entrypoint"),
        env=_str_list(body.get("Env"), "Env"),
        workdir=_opt_str(body.get("WorkingDir")),
        user=_user(body.get("User")),
        hostname=_opt_str(body.get("Hostname")),
        tty=bool(body.get("Tty")),
        open_stdin=bool(body.get("OpenStdin")),
        stdin_once=bool(body.get("StdinOnce")),
        attach_stdin=bool(body.get("AttachStdin")),
        attach_stdout=bool(body.get("AttachStdout")),
        attach_stderr=bool(body.get("AttachStderr")),
        labels=_labels(body.get("Labels")),
        exposed_ports=sorted(_obj(body.get("ExposedPorts"), "ExposedPorts")),
        stop_signal=_opt_str(body.get("StopSignal")),
        stop_timeout=_stop_timeout(body.get("StopTimeout")),
        auto_remove=bool(host.get("AutoRemove")),
        memory_mib=memory_mib(host.get("Memory")),
        cpus=cpu_count(host.get("NanoCpus"), host.get("CpuCount")),
        network=network,
        network_aliases=network_aliases,
        more_networks=more_networks,
        publish=publish_specs(host.get("PortBindings")),
        publish_all=bool(host.get("PublishAllPorts")),
        volumes=mounts.volumes,
        anonymous_volumes=mounts.anonymous,
        tmpfs=mounts.tmpfs,
        read_only=bool(host.get("ReadonlyRootfs")),
        console_size=console_size(host.get("ConsoleSize")),
        init=init if isinstance(init, bool) else None,
        dns=_str_list(host.get("Dns"), "HostConfig.Dns"),
        extra_hosts=_str_list(host.get("ExtraHosts"), "HostConfig.ExtraHosts"),
        restart_policy=str(restart.get("Name") or "no"),
        log_driver=_opt_str(log_config.get("Type")),
        log_opts=_log_opts(log_config.get("Config")),
        options=container_options(body, host),
    )


# ---------------------------------------------------------------------------------- filters

def parse_filters(raw: str | None) -> dict[str, list[str]]:
    """The ``filters`` query parameter in either encoding clients use (notes §5).

    The CLI and compose send ``{"label": {"k=v": true}}``, docker-py ``{"label": ["k=v"]}``.
    """
    if raw is None or not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidRequest(f"invalid filter: {raw!r} is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("invalid filter: expected a JSON object of filter names")
    result: dict[str, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            values = [str(v) for v in value]
        elif isinstance(value, list):
            values = [str(v) for v in value]
        elif isinstance(value, str):
            values = [value]
        else:
            raise InvalidRequest(f"invalid filter {key!r}: expected a list or an object of values")
        result[str(key)] = values
    return result


# ---------------------------------------------------------------------------------- signals

def parse_signal(text: str | int | None, default: int | None = None) -> int:
    """``KILL``, ``SIGKILL``, ``kill``, ``9`` -> 9; empty gives ``default`` (if any)."""
    value = str(text if text is not None else "").strip()
    if not value:
        if default is None:
            raise InvalidRequest("no signal given")
        return default
    if value.isdigit():
        number = int(value)
        if not 0 < number < signal.NSIG:
            raise InvalidRequest(f"invalid signal: {value}")
        return number
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidRequest(f"invalid signal: {value}") from None


# ---------------------------------------------------------------------------------- archive

# Go's os.FileMode bits (io/fs): the type lives in the high bits, not in S_IFMT.
GO_MODE_DIR = 1 << 31
GO_MODE_APPEND = 1 << 30
GO_MODE_SYMLINK = 1 << 27
GO_MODE_DEVICE = 1 << 26
GO_MODE_NAMED_PIPE = 1 << 25
GO_MODE_SOCKET = 1 << 24
GO_MODE_SETUID = 1 << 23
GO_MODE_SETGID = 1 << 22
GO_MODE_CHAR_DEVICE = 1 << 21
GO_MODE_STICKY = 1 << 20


def go_file_mode(st_mode: int) -> int:
    """A POSIX ``st_mode`` as Go's ``os.FileMode`` (what X-Docker-Container-Path-Stat holds).

    The CLI's ``docker cp`` reads ``Mode.IsDir()`` from it to choose between "copy into"
    and "copy as" (notes §6).
    """
    mode = st_mode & 0o777
    fmt = stat.S_IFMT(st_mode)
    mode |= {
        stat.S_IFDIR: GO_MODE_DIR,
        stat.S_IFLNK: GO_MODE_SYMLINK,
        stat.S_IFBLK: GO_MODE_DEVICE,
        stat.S_IFCHR: GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE,
        stat.S_IFIFO: GO_MODE_NAMED_PIPE,
        stat.S_IFSOCK: GO_MODE_SOCKET,
    }.get(fmt, 0)
    if st_mode & stat.S_ISUID:
        mode |= GO_MODE_SETUID
    if st_mode & stat.S_ISGID:
        mode |= GO_MODE_SETGID
    if st_mode & stat.S_ISVTX:
        mode |= GO_MODE_STICKY
    return mode


def path_stat_header(name: str, size: int, st_mode: int, mtime: float, link_target: str = "") -> str:
    """The ``X-Docker-Container-Path-Stat`` header: base64 of moby's ContainerPathStat JSON."""
    payload = {"name": name, "size": size, "mode": go_file_mode(st_mode), "mtime": format_time(mtime),
               "linkTarget": link_target}
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


# ---------------------------------------------------------------------------------- to kvmc

def run_options(req: CreateRequest) -> RunOptions:
    """A docker create request as the options kvmc's create takes (the engine resolves its
    networks: kvmc/runtime.py, Runtime._networks)."""
    return RunOptions(
        image=req.image, name=req.name, auto_remove=req.auto_remove, detach=True,
        process=ProcessOptions(command=list(req.cmd or []), entrypoint=req.entrypoint, env=list(req.env),
                               workdir=req.workdir, user=req.user, hostname=req.hostname,
                               interactive=req.open_stdin),
        memory_mib=req.memory_mib, cpus=req.cpus, network=req.network, network_aliases=list(req.network_aliases),
        more_networks=[(name, list(aliases)) for name, aliases in req.more_networks], publish=list(req.publish),
        publish_all=req.publish_all, volumes=list(req.volumes), tmpfs=list(req.tmpfs), read_only=req.read_only,
        log_opts=dict(req.log_opts),
        docker=DockerFields(labels=dict(req.labels), tty=req.tty, console_size=req.console_size,
                            open_stdin=req.open_stdin,
                            stdin_once=req.stdin_once, entrypoint=req.entrypoint, cmd=req.cmd,
                            stop_signal=req.stop_signal, stop_timeout=req.stop_timeout),
        options=req.options,
    )
