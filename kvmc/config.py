"""kvmc configuration: YAML files plus ``KVMC_*`` environment variables, one typed object.

Read once by the CLI and passed down, so that no module deep inside reads files or the
environment on its own. Precedence, lowest first: built-in defaults,
``/etc/kvmc/config.yaml``, ``~/.config/kvmc/config.yaml``, ``$KVMC_CONFIG`` (a file),
``KVMC_<KEY>`` variables (e.g. ``KVMC_MEMORY_MIB=512``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from kvmc.errors import UsageError

ACCEL_CHOICES = ("auto", "kvm", "tcg")
# Guest kernels images/build.sh can build: Debian's cloud kernel (virtio as modules) or kvmc's
# own (images/kernel/, everything built in, boots faster). Each has its own guest directory.
KERNEL_CHOICES = ("debian", "kvmc")
GUEST_SUBDIRS = {"debian": "guest", "kvmc": "guest-kvmc"}
AUTO_POOL_KINDS = ("clone", "hot")
"""What kvmc serve's automatic pools keep: clone (hot template clones: one template per image
and size, its clones waiting paused) or hot (hot members: each restored from its own save
file, waiting paused)."""
# `kvmc host` VMs boot kvmc's kernel with the host fragment (images/kernel/kvmc-host.config).
HOST_GUEST_SUBDIR = "guest-kvmc-host"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_run_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/kvmc")
    return Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/kvmc-{os.getuid()}")) / "kvmc"


def _default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/kvmc")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "kvmc"


def _default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/kvmc")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvmc"


@dataclass(frozen=True)
class Config:
    """Everything a kvmc command may need to know about the host and its defaults."""

    data_dir: Path = field(default_factory=_default_data_dir)
    # Unix sockets live here, not in data_dir: their paths must stay under 108 bytes.
    run_dir: Path = field(default_factory=_default_run_dir)
    # Build results any state root on this machine may reuse (the kvmc/docker-host OCI layout,
    # keyed by its inputs): outside data_dir, so a fresh state root imports instead of rebuilding.
    cache_dir: Path = field(default_factory=_default_cache_dir)
    libvirt_uri: str = "qemu:///system"
    accel: str = "auto"
    memory_mib: int = 256
    cpus: int = 1
    # Which guest kernel VMs boot; selects data_dir/guest-kvmc (kvmc, the default: boots in a
    # third of the Debian kernel's time under TCG, bench/boot.py) or data_dir/guest (debian).
    # guest_dir, when set, overrides the directory whatever the kernel.
    kernel: str = "kvmc"
    guest_dir: Path | None = None
    # The guest of `kvmc host` VMs (netfilter, bridge, veth for Docker Engine): data_dir/
    # guest-kvmc-host unless set.
    host_guest_dir: Path | None = None
    templates_dir: Path = REPO_ROOT / "templates"
    # After a run claims a pool member, warm a replacement in the background (kvmc pool warm).
    pool_refill: bool = False
    # kvmc serve's automatic pools (kvmc/pool/auto.py): warm VMs kept for the images the server
    # has run, within auto_pool_budget ("N%" of the memory available when the server starts,
    # or a size such as 512m; 0 turns them off), auto_pool_size per image and VM size, removed
    # after auto_pool_idle_s unused; auto_pool_kind: clone (hot template clones) or hot (hot
    # members).
    auto_pool_budget: str = "10%"
    auto_pool_size: int = 1
    auto_pool_idle_s: float = 600.0
    auto_pool_kind: str = "clone"
    boot_timeout_s: float = 60.0
    stop_timeout_s: int = 10
    # Each container's log (kvmc/logs.py): files of at most log_max_size (docker's units, "-1":
    # no cap) and log_max_file of them, unless run/create --log-opt says otherwise.
    log_max_size: str = "20m"
    log_max_file: int = 5
    # The driver of volumes made without one (run -v NAME:/path, volume create, the API's
    # Driver "local"): kvmc-ext4 (a disk: fast, one running container at a time) or kvmc-dir
    # (a host directory shared by virtiofs: any number of running containers, as CI jobs and
    # their services share a build volume). kvmc/volumes.py.
    volume_driver: str = "kvmc-ext4"
    # TCG's translation cache per VM in MiB (QEMU's -accel tcg,tb-size; 0: QEMU's own default,
    # up to 1 GiB as the guest runs more code). A small cache makes idle containers cheap (an
    # idle template clone used ~16 MiB of it; bench/density.py) at the price of
    # retranslating when a busy guest fills it; docs/platform.md, "Density".
    tcg_tb_cache_mib: int = 0
    # Containers' monitors are forked by one resident server per user (kvmc/forkserver.py), so
    # they share its interpreter's memory (5 MiB each instead of 21.5 MiB: bench/density.py);
    # false: each is forked from the CLI that starts it (or a fresh interpreter for kvmc serve).
    monitor_forkserver: bool = True

    @property
    def template_cache_dir(self) -> Path:
        """Compiled domain XML templates (kvmc.domain: jinja2's bytecode cache)."""
        return self.cache_dir / "templates"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    @property
    def containers_dir(self) -> Path:
        return self.data_dir / "containers"

    @property
    def guest_artefacts_dir(self) -> Path:
        return self.guest_dir or self.data_dir / GUEST_SUBDIRS[self.kernel]

    def auto_pool_budget_mib(self, available_mib: float) -> float:
        """``auto_pool_budget`` in MiB: ``N%`` of ``available_mib`` (the host's available memory
        when the server starts), a size (``512m``, ``2g``), or ``0``/``off`` (no automatic pools)."""
        value = str(self.auto_pool_budget).strip().lower()
        if value in ("0", "off", "false", "no", ""):
            return 0.0
        if value.endswith("%"):
            try:
                share = float(value[:-1])
            except ValueError:
                share = -1.0
            if not 0 <= share <= 100:
                raise UsageError(f'invalid auto_pool_budget "{self.auto_pool_budget}": use a share such as 10% '
                                 "(0% to 100%) or a size such as 512m")
            return available_mib * share / 100
        from kvmc.process import size_bytes

        return size_bytes(value, "auto_pool_budget") / (1 << 20)

    @property
    def host_guest_artefacts_dir(self) -> Path:
        return self.host_guest_dir or self.data_dir / HOST_GUEST_SUBDIR

    def validate(self) -> Config:
        if self.accel not in ACCEL_CHOICES:
            raise UsageError(f"invalid accel {self.accel!r}: choose one of {', '.join(ACCEL_CHOICES)}")
        if self.kernel not in KERNEL_CHOICES:
            raise UsageError(f"invalid kernel {self.kernel!r}: choose one of {', '.join(KERNEL_CHOICES)}")
        from kvmc.volumes import VOLUME_DRIVERS

        if self.volume_driver not in VOLUME_DRIVERS:
            raise UsageError(f"invalid volume_driver {self.volume_driver!r}: choose one of {', '.join(VOLUME_DRIVERS)}")
        if self.memory_mib < 64:
            raise UsageError(f"memory {self.memory_mib} MiB is too small: a kvmc VM needs at least 64 MiB")
        if self.tcg_tb_cache_mib < 0:
            raise UsageError(f"tcg_tb_cache_mib must be 0 (QEMU's default) or more, not {self.tcg_tb_cache_mib}")
        if self.cpus < 1:
            raise UsageError(f"cpus must be at least 1, not {self.cpus}")
        if self.auto_pool_kind not in AUTO_POOL_KINDS:
            raise UsageError(f"invalid auto_pool_kind {self.auto_pool_kind!r}: "
                             f"choose one of {', '.join(AUTO_POOL_KINDS)}")
        if self.auto_pool_size < 1 or self.auto_pool_idle_s <= 0:
            raise UsageError("auto_pool_size must be at least 1 and auto_pool_idle_s more than 0")
        self.auto_pool_budget_mib(1024.0)  # raises UsageError if malformed
        from kvmc.logs import resolve_log_opts

        try:
            resolve_log_opts(None, self.log_max_size, self.log_max_file)
        except UsageError as exc:
            raise UsageError(f"config keys log_max_size/log_max_file: {exc}") from None
        return self


_TYPES = {f.name: f for f in fields(Config)}


def _coerce(key: str, value: Any) -> Any:
    kind = str(_TYPES[key].type)
    if value is None:
        if "None" in kind:
            return None
        raise UsageError(f"config key {key!r} needs a value")
    try:
        if "Path" in kind:
            return Path(os.path.expanduser(str(value)))
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, not {value!r}")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"config key {key!r}: {exc}") from exc


def _apply(config: Config, values: Mapping[str, Any], source: str) -> Config:
    changes = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in _TYPES:
            raise UsageError(f"{source}: unknown config key {raw_key!r} (known: {', '.join(sorted(_TYPES))})")
        changes[key] = _coerce(key, value)
    return replace(config, **changes)


def config_files(env: Mapping[str, str]) -> list[Path]:
    home = Path(env.get("HOME", str(Path.home())))
    files = [Path("/etc/kvmc/config.yaml"), home / ".config/kvmc/config.yaml"]
    if env.get("KVMC_CONFIG"):
        files.append(Path(env["KVMC_CONFIG"]))
    return files


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from files and the environment (see module docstring)."""
    env = os.environ if env is None else env
    config = Config()
    for path in config_files(env):
        if not path.is_file():
            continue
        import yaml  # only with a config file: importing PyYAML costs every kvmc call ~15 ms

        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise UsageError(f"{path}: expected a mapping of settings")
        config = _apply(config, values, str(path))
    from_env = {k[len("KVMC_"):].lower(): v for k, v in env.items() if k.startswith("KVMC_") and k != "KVMC_CONFIG"}
    config = _apply(config, {k: v for k, v in from_env.items() if k in _TYPES}, "environment")
    return config.validate()
