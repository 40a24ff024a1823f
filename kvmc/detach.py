"""docker's detach keys: the key sequence that leaves a TTY attach with the process running.

Why here, in the engine's relay (kvmc/agent.py ``attach_process``) rather than in a front
door: both doors run that one relay (the CLI in its own process, ``kvmc serve`` in a worker
thread per hijacked stream), so one scanner serves ``kvmc run -it``/``attach``/``exec -it``
and the API's ``detachKeys``. As dockerd, it applies to TTY attaches only: without a TTY the
bytes are the program's input and ctrl-p is data.
"""

from __future__ import annotations

from kvmc.errors import UsageError

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"
_CTRL_NAMES = ["@", *"abcdefghijklmnopqrstuvwxyz", "[", "\\", "]", "^", "_"]


def parse_detach_keys(spec: str | None) -> bytes:
    """docker's ``--detach-keys``: comma-separated keys, each one character or ``ctrl-X``
    (X one of a-z, @, [, \\, ], ^, _). None or "" means the default, ctrl-p ctrl-q."""
    if not spec:
        spec = DEFAULT_DETACH_KEYS
    out = bytearray()
    for key in spec.split(","):
        if len(key) == 1:
            out += key.encode()
            continue
        name = key[5:].lower() if key.lower().startswith("ctrl-") else None
        if name is None or name not in _CTRL_NAMES:
            raise UsageError(f"Invalid detach keys ({spec}) provided: unknown key '{key}' "
                             "(use one character or ctrl-a..ctrl-z, ctrl-@, ctrl-[, ctrl-\\, ctrl-], ctrl-^, ctrl-_)")
        out.append(_CTRL_NAMES.index(name))
    if not out:
        raise UsageError(f"Invalid detach keys ({spec}) provided")
    return bytes(out)


class DetachScanner:
    """Watches a stdin byte stream for the detach sequence.

    :meth:`feed` returns what to forward and whether the sequence is complete. Bytes that may
    start the sequence are held back until the next key says whether they do (a lone ctrl-p
    reaches the process with the key after it, as with docker); the sequence itself is never
    forwarded, and nothing after it in the same read is either.
    """

    def __init__(self, keys: bytes) -> None:
        if not keys:
            raise ValueError("no detach keys")
        self.keys = keys
        self._held = 0  # how many bytes of keys are matched and held back

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        for byte in data:
            if byte == self.keys[self._held]:
                self._held += 1
                if self._held == len(self.keys):
                    self._held = 0
                    return bytes(out), True
                continue
            if self._held:  # a false start: the held keys were data after all
                out += self.keys[: self._held]
                self._held = 0
                if byte == self.keys[0]:
                    self._held = 1
                    continue
            out.append(byte)
        return bytes(out), False
