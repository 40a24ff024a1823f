"""kvmc/sshfwd.py against an in-process paramiko SSH server: key login with a per-host key, the
pinned host key, the direct-streamlocal channel open and the pump's half-close (the client's
EOF reaches the server, whose reply still comes back)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import paramiko
import pytest

from kvmc.service.hosts import _make_key_pair
from kvmc.sshfwd import connect, open_streamlocal, pump

STREAMLOCAL = "direct-streamlocal@openssh.com"


class _Server(paramiko.ServerInterface):
    def __init__(self, allowed: paramiko.PKey) -> None:
        self.allowed = allowed
        self.kinds: list[str] = []

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "root" and key.get_base64() == self.allowed.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        self.kinds.append(kind)
        return paramiko.OPEN_SUCCEEDED if kind == STREAMLOCAL else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def _serve(host_key: paramiko.PKey, client_key: paramiko.PKey) -> tuple[int, _Server, threading.Thread]:
    """A one-connection SSH server; each streamlocal channel replies ``PONG:`` + all it read
    once the client's side ended (EOF)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = _Server(client_key)

    def run() -> None:
        conn, _ = listener.accept()
        transport = paramiko.Transport(conn)
        transport.add_server_key(host_key)
        transport.start_server(server=server)
        while transport.is_active():
            chan = transport.accept(timeout=1)
            if chan is None:
                continue
            data = b""
            while chunk := chan.recv(4096):
                data += chunk
            chan.sendall(b"PONG:" + data)
            chan.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[1], server, thread


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, paramiko.PKey]:
    _make_key_pair(tmp_path / "id_ed25519")
    return tmp_path / "id_ed25519", paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "id_ed25519"))


def test_key_pair_is_private_and_loadable(keys: tuple[Path, paramiko.PKey]) -> None:
    path, key = keys
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.with_name("id_ed25519.pub").read_text().startswith(f"ssh-ed25519 {key.get_base64()} ")


def test_streamlocal_channel_passes_half_close(tmp_path: Path, keys: tuple[Path, paramiko.PKey]) -> None:
    key_file, client_key = keys
    port, server, _ = _serve(paramiko.ECDSAKey.generate(), client_key)
    client = connect(port, key_file, tmp_path / "known_host")
    try:
        chan = open_streamlocal(client.get_transport(), "/var/run/docker.sock")
        assert server.kinds == [STREAMLOCAL]
        ours, theirs = socket.socketpair()
        relay = threading.Thread(target=pump, args=(theirs, chan), daemon=True)
        relay.start()
        ours.sendall(b"ping")
        ours.shutdown(socket.SHUT_WR)  # docker's CloseWrite: the reply must still arrive
        reply = b""
        while chunk := ours.recv(4096):
            reply += chunk
        assert reply == b"PONG:ping"
        relay.join(10)
        assert not relay.is_alive()
    finally:
        client.close()
    assert (tmp_path / "known_host").read_text().startswith("ecdsa-sha2-nistp256 ")


def test_changed_host_key_is_refused(tmp_path: Path, keys: tuple[Path, paramiko.PKey]) -> None:
    key_file, client_key = keys
    (tmp_path / "known_host").write_text("ssh-ed25519 AAAAnot-this-one\n")
    port, _, _ = _serve(paramiko.ECDSAKey.generate(), client_key)
    with pytest.raises(paramiko.SSHException, match="host key .* changed"):
        connect(port, key_file, tmp_path / "known_host")
