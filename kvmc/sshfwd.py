"""SSH into a ``kvmc host`` with paramiko: one command or a shell, and the DOCKER_HOST forwarder.

The forwarder is a host process (``python -m kvmc.sshfwd SOCKET PORT KEY KNOWN_HOST PIDFILE``)
that listens on a unix socket (mode 0600: only its owner may drive the nested engine) and,
for each client, opens an SSH channel to the guest's ``/var/run/docker.sock``: OpenSSH's
``direct-streamlocal@openssh.com`` (what ``ssh -L local.sock:/var/run/docker.sock`` sends). No
process runs in the guest per connection and no TCP port is open but sshd's, which kvmc publishes
on 127.0.0.1 only.

paramiko implements channel opens for TCP forwarding and X11 only, so :func:`open_streamlocal`
sends the open itself; it follows paramiko's own ``Transport.open_channel`` step by step (written
by hand because no maintained Python SSH client we depend on offers this; asyncssh does, but kvmc
already depends on paramiko).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import paramiko
from paramiko.common import cMSG_CHANNEL_OPEN, DEFAULT_MAX_PACKET_SIZE, DEFAULT_WINDOW_SIZE
from paramiko.message import Message

GUEST_DOCKER_SOCKET = "/var/run/docker.sock"
# paramiko logs a failed attempt (sshd not up yet while a host boots) with a traceback through
# logging's last-resort handler; kvmc reports its own errors, so paramiko's go nowhere.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False
CHUNK = 65536


class PinnedHostKey(paramiko.MissingHostKeyPolicy):
    """Trust on first use, pinned in a file: the first connection (``kvmc host create``, right
    after the guest made its key) records it; later ones must present the same key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        line = f"{key.get_name()} {key.get_base64()}"
        if self.path.exists():
            if self.path.read_text().strip() != line:
                raise paramiko.SSHException(f"host key of {hostname} changed: not the VM this host created")
            return
        self.path.write_text(line + "\n")


def connect(port: int, key_file: Path, known_host: Path, timeout: float = 10.0) -> paramiko.SSHClient:
    """An SSH client logged in as root on 127.0.0.1:``port`` with the host's own key."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(PinnedHostKey(known_host))
    client.connect("127.0.0.1", port=port, username="root", key_filename=str(key_file), timeout=timeout,
                   banner_timeout=timeout, auth_timeout=timeout, allow_agent=False, look_for_keys=False)
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(15)
    return client


def open_streamlocal(transport: paramiko.Transport, path: str, timeout: float = 10.0) -> paramiko.Channel:
    """A channel to the unix socket ``path`` on the server (direct-streamlocal@openssh.com:
    string path, string reserved, uint32 reserved), as paramiko's open_channel does for TCP."""
    if not transport.active:
        raise paramiko.SSHException("SSH session not active")
    with transport.lock:
        chanid = transport._next_channel()  # noqa: SLF001 - see the module docstring
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("direct-streamlocal@openssh.com")
        m.add_int(chanid)
        m.add_int(DEFAULT_WINDOW_SIZE)
        m.add_int(DEFAULT_MAX_PACKET_SIZE)
        m.add_string(path)
        m.add_string("")
        m.add_int(0)
        chan = paramiko.Channel(chanid)
        transport._channels.put(chanid, chan)  # noqa: SLF001
        transport.channel_events[chanid] = event = threading.Event()
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)  # noqa: SLF001
        chan._set_window(DEFAULT_WINDOW_SIZE, DEFAULT_MAX_PACKET_SIZE)  # noqa: SLF001
    transport._send_user_message(m)  # noqa: SLF001
    deadline = time.monotonic() + timeout
    while not event.wait(0.1):
        if not transport.active:
            raise transport.get_exception() or paramiko.SSHException("SSH session ended")
        if time.monotonic() > deadline:
            raise paramiko.SSHException(f"timeout opening a channel to {path}")
    opened = transport._channels.get(chanid)  # noqa: SLF001
    if opened is None:
        raise transport.get_exception() or paramiko.ChannelException(2, f"the server refused a channel to {path}")
    return opened


def pump(client_sock: socket.socket, chan: paramiko.Channel) -> None:
    """Copy both ways until both sides ended, passing half-closes on (docker's attach closes
    its write side and still reads the output)."""
    open_in, open_out = True, True
    try:
        while open_in or open_out:
            watch = ([client_sock] if open_in else []) + ([chan] if open_out else [])
            ready, _, _ = select.select(watch, [], [], 60)
            if client_sock in ready:
                data = client_sock.recv(CHUNK)
                if data:
                    chan.sendall(data)
                else:
                    open_in = False
                    chan.shutdown_write()
            if chan in ready:
                data = chan.recv(CHUNK)
                if data:
                    client_sock.sendall(data)
                else:
                    open_out = False
                    try:
                        client_sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            if chan.closed:
                break
    except OSError:
        pass
    finally:
        chan.close()
        client_sock.close()


def run_command(port: int, key_file: Path, known_host: Path, command: str | None) -> int:
    """``kvmc host ssh``: ``command`` (output relayed, its exit status returned) or, without one,
    an interactive shell on a pty when stdin is a terminal."""
    client = connect(port, key_file, known_host)
    try:
        transport = client.get_transport()
        assert transport is not None
        chan = transport.open_session()
        interactive = command is None and os.isatty(0)
        if interactive:
            cols, rows = os.get_terminal_size(0)
            chan.get_pty(term=os.environ.get("TERM", "xterm"), width=cols, height=rows)
        if command is None:
            chan.invoke_shell() if interactive else chan.exec_command("/bin/sh")
        else:
            chan.exec_command(command)
        return _relay_stdio(chan, interactive)
    finally:
        client.close()


def _relay_stdio(chan: paramiko.Channel, raw: bool) -> int:
    import termios
    import tty

    saved = termios.tcgetattr(0) if raw else None
    if raw:
        tty.setraw(0)
    try:
        stdin_open = True
        while True:
            watch = [chan] + ([0] if stdin_open else [])
            ready, _, _ = select.select(watch, [], [], 0.5)
            if chan in ready:
                while chan.recv_stderr_ready():
                    os.write(2, chan.recv_stderr(CHUNK))
                if chan.recv_ready():
                    data = chan.recv(CHUNK)
                    if data:
                        os.write(1, data)
                elif not chan.recv_stderr_ready() and chan.eof_received:
                    break
            if 0 in ready:
                data = os.read(0, CHUNK)
                if data:
                    chan.sendall(data)
                else:
                    stdin_open = False
                    chan.shutdown_write()
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
        while chan.recv_stderr_ready():
            os.write(2, chan.recv_stderr(CHUNK))
        return chan.recv_exit_status()
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def serve(socket_path: Path, port: int, key_file: Path, known_host: Path) -> None:
    """The forwarder's loop: accept on ``socket_path``, one SSH channel per client; reconnects
    the SSH session when it dropped (a guest sshd restart). Runs until SIGTERM."""
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    client = connect(port, key_file, known_host)

    def stop(_signum: int, _frame: object) -> None:
        socket_path.unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        conn, _ = listener.accept()
        try:
            transport = client.get_transport()
            if transport is None or not transport.active:
                client.close()
                client = connect(port, key_file, known_host)
                transport = client.get_transport()
            chan = open_streamlocal(transport, GUEST_DOCKER_SOCKET)
        except (OSError, paramiko.SSHException) as exc:
            print(f"kvmc-host-forwarder: {exc}", file=sys.stderr, flush=True)
            conn.close()
            continue
        threading.Thread(target=pump, args=(conn, chan), daemon=True).start()


def main(argv: list[str]) -> None:
    """``SOCKET PORT KEY KNOWN_HOST PIDFILE``: write the pid file, then serve (detached by the caller)."""
    socket_path, port, key_file, known_host, pidfile = argv
    Path(pidfile).write_text(f"{os.getpid()}\n")
    serve(Path(socket_path), int(port), Path(key_file), Path(known_host))


if __name__ == "__main__":
    main(sys.argv[1:])
