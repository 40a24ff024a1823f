"""kvmc.config: defaults, YAML files, KVMC_* variables and their precedence.

Every test passes its own ``env`` (with HOME pointing into tmp_path) so the developer's
real ~/.config/kvmc/config.yaml and environment never leak in. /etc/kvmc/config.yaml is
read too; it does not exist on the test machines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmc.config import REPO_ROOT, Config, config_files, load_config
from kvmc.errors import UsageError


@pytest.fixture
def home(tmp_path: Path) -> Path:
    assert not Path("/etc/kvmc/config.yaml").exists(), "a system config would make these tests unreliable"
    home = tmp_path / "home"
    home.mkdir()
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user_config(home: Path, text: str) -> Path:
    return write(home / ".config/kvmc/config.yaml", text)


def test_defaults(home):
    config = load_config({"HOME": str(home)})
    assert config.memory_mib == 256
    assert config.cpus == 1
    assert config.accel == "auto"
    assert config.libvirt_uri == "qemu:///system"
    assert config.guest_dir is None
    assert config.templates_dir == REPO_ROOT / "templates"
    assert config.boot_timeout_s == 60.0
    assert config.stop_timeout_s == 10
    assert config == Config().validate()


def test_derived_dirs():
    config = Config(data_dir=Path("/d"))
    assert config.images_dir == Path("/d/images")
    assert config.containers_dir == Path("/d/containers")
    assert config.guest_artefacts_dir == Path("/d/guest-kvmc")  # the default kernel is kvmc's
    assert Config(data_dir=Path("/d"), guest_dir=Path("/g")).guest_artefacts_dir == Path("/g")


def test_config_files_order(home, tmp_path):
    assert config_files({"HOME": str(home)}) == [
        Path("/etc/kvmc/config.yaml"),
        home / ".config/kvmc/config.yaml",
    ]
    explicit = tmp_path / "explicit.yaml"
    assert config_files({"HOME": str(home), "KVMC_CONFIG": str(explicit)})[-1] == explicit
    # An empty KVMC_CONFIG means no extra file.
    assert len(config_files({"HOME": str(home), "KVMC_CONFIG": ""})) == 2


def test_home_config_is_read(home):
    user_config(home, "memory_mib: 512\ncpus: 2\naccel: tcg\nlibvirt_uri: qemu:///session\n")
    config = load_config({"HOME": str(home)})
    assert (config.memory_mib, config.cpus, config.accel) == (512, 2, "tcg")
    assert config.libvirt_uri == "qemu:///session"


def test_kvmc_config_file_overrides_defaults(home, tmp_path):
    path = write(tmp_path / "kvmc.yaml", "memory_mib: 1024\nboot_timeout_s: 5\n")
    config = load_config({"HOME": str(home), "KVMC_CONFIG": str(path)})
    assert config.memory_mib == 1024
    assert config.boot_timeout_s == 5.0 and isinstance(config.boot_timeout_s, float)
    assert config.cpus == 1  # untouched keys keep their defaults


def test_kvmc_config_file_overrides_home_file(home, tmp_path):
    user_config(home, "memory_mib: 512\ncpus: 3\n")
    path = write(tmp_path / "kvmc.yaml", "memory_mib: 768\n")
    config = load_config({"HOME": str(home), "KVMC_CONFIG": str(path)})
    assert config.memory_mib == 768  # from $KVMC_CONFIG
    assert config.cpus == 3  # from the home file


def test_env_overrides_file(home, tmp_path):
    path = write(tmp_path / "kvmc.yaml", "memory_mib: 768\naccel: kvm\ncpus: 2\n")
    config = load_config({
        "HOME": str(home),
        "KVMC_CONFIG": str(path),
        "KVMC_MEMORY_MIB": "2048",
        "KVMC_ACCEL": "tcg",
    })
    assert config.memory_mib == 2048
    assert config.accel == "tcg"
    assert config.cpus == 2  # not overridden by the environment


def test_env_values_are_coerced(home, tmp_path):
    config = load_config({
        "HOME": str(home),
        "KVMC_CPUS": "4",
        "KVMC_STOP_TIMEOUT_S": "3",
        "KVMC_DATA_DIR": str(tmp_path / "data"),
    })
    assert config.cpus == 4 and isinstance(config.cpus, int)
    assert config.stop_timeout_s == 3
    assert config.data_dir == tmp_path / "data" and isinstance(config.data_dir, Path)
    assert config.containers_dir == tmp_path / "data/containers"


def test_env_bad_number_is_usage_error(home):
    with pytest.raises(UsageError, match="memory_mib"):
        load_config({"HOME": str(home), "KVMC_MEMORY_MIB": "lots"})


def test_unrelated_kvmc_env_vars_are_ignored(home):
    config = load_config({"HOME": str(home), "KVMC_SOMETHING_ELSE": "1"})
    assert config == Config().validate()


def test_unknown_key_in_file(home):
    path = user_config(home, "memory_mib: 512\nturbo_mode: on\n")
    with pytest.raises(UsageError) as excinfo:
        load_config({"HOME": str(home)})
    assert "turbo_mode" in str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_bad_yaml(home, tmp_path):
    path = write(tmp_path / "kvmc.yaml", "memory_mib: [1, 2\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config({"HOME": str(home), "KVMC_CONFIG": str(path)})


def test_yaml_not_a_mapping(home, tmp_path):
    path = write(tmp_path / "kvmc.yaml", "- memory_mib\n- 512\n")
    with pytest.raises(UsageError, match="mapping"):
        load_config({"HOME": str(home), "KVMC_CONFIG": str(path)})


def test_empty_file_changes_nothing(home, tmp_path):
    path = write(tmp_path / "kvmc.yaml", "# nothing here\n")
    assert load_config({"HOME": str(home), "KVMC_CONFIG": str(path)}) == Config().validate()


def test_missing_kvmc_config_file_is_ignored(home, tmp_path):
    config = load_config({"HOME": str(home), "KVMC_CONFIG": str(tmp_path / "absent.yaml")})
    assert config.memory_mib == 256


def test_bad_value_type_in_file(home):
    user_config(home, "cpus: many\n")
    with pytest.raises(UsageError, match="cpus"):
        load_config({"HOME": str(home)})


@pytest.mark.parametrize("accel", ["xen", "KVM", "hvf"])
def test_invalid_accel(home, accel):
    with pytest.raises(UsageError, match="invalid accel"):
        load_config({"HOME": str(home), "KVMC_ACCEL": accel})


@pytest.mark.parametrize("accel", ["auto", "kvm", "tcg"])
def test_valid_accel(home, accel):
    assert load_config({"HOME": str(home), "KVMC_ACCEL": accel}).accel == accel


def test_memory_below_64_mib(home):
    user_config(home, "memory_mib: 63\n")
    with pytest.raises(UsageError, match="too small"):
        load_config({"HOME": str(home)})


def test_memory_64_mib_is_enough(home):
    assert load_config({"HOME": str(home), "KVMC_MEMORY_MIB": "64"}).memory_mib == 64


def test_cpus_below_one(home):
    with pytest.raises(UsageError, match="cpus"):
        load_config({"HOME": str(home), "KVMC_CPUS": "0"})


def test_dashes_in_keys(home):
    user_config(home, "memory-mib: 640\nlibvirt-uri: qemu:///session\nboot-timeout-s: 12.5\n")
    config = load_config({"HOME": str(home)})
    assert config.memory_mib == 640
    assert config.libvirt_uri == "qemu:///session"
    assert config.boot_timeout_s == 12.5


def test_unknown_dashed_key_is_named_as_written(home):
    user_config(home, "memory-mb: 640\n")
    with pytest.raises(UsageError, match="memory-mb"):
        load_config({"HOME": str(home)})


def test_paths_expand_tilde(home, tmp_path):
    user_config(home, f"guest_dir: {tmp_path}/guest\ntemplates_dir: {tmp_path}/tpl\n")
    config = load_config({"HOME": str(home)})
    assert config.guest_dir == tmp_path / "guest"
    assert config.guest_artefacts_dir == tmp_path / "guest"
    assert config.templates_dir == tmp_path / "tpl"
    assert Path(str(load_config({"HOME": str(home), "KVMC_GUEST_DIR": "~/g"}).guest_dir)).is_absolute()


def test_null_guest_dir_means_unset(home):
    # guest_dir is optional (Path | None): an explicit YAML null must keep it unset rather
    # than turning into the relative path "None".
    user_config(home, "guest_dir: null\n")
    config = load_config({"HOME": str(home)})
    assert config.guest_dir is None


def test_kernel_selects_the_guest_dir(home):
    assert Config(data_dir=Path("/d")).kernel == "kvmc"
    assert Config(data_dir=Path("/d")).guest_artefacts_dir == Path("/d/guest-kvmc")
    assert Config(data_dir=Path("/d"), kernel="kvmc").guest_artefacts_dir == Path("/d/guest-kvmc")
    assert Config(data_dir=Path("/d"), kernel="debian").guest_artefacts_dir == Path("/d/guest")
    # an explicit guest_dir wins whatever the kernel
    assert Config(data_dir=Path("/d"), kernel="kvmc", guest_dir=Path("/g")).guest_artefacts_dir == Path("/g")
    assert load_config({"HOME": str(home), "KVMC_KERNEL": "kvmc"}).kernel == "kvmc"
    assert load_config({"HOME": str(home), "KVMC_KERNEL": "debian"}).kernel == "debian"
    user_config(home, "kernel: debian\n")
    assert load_config({"HOME": str(home)}).kernel == "debian"


def test_unknown_kernel_is_a_usage_error(home):
    with pytest.raises(UsageError, match="kernel"):
        load_config({"HOME": str(home), "KVMC_KERNEL": "linux"})

