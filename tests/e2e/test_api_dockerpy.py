"""`kvmc serve` driven by docker-py 7.1, end to end (real microVMs).

The scenarios restate docker-py's own integration tests (models_containers_test.py:
test_run, test_run_with_error, test_run_detach, test_exec_run_success/error_code, test_logs,
test_wait, test_remove; api_container_test.py ArchiveTest; models_volumes_test.py) in kvmc's
words, against kvmc's default image.
"""

from __future__ import annotations

import io
import tarfile
import time

import docker
import docker.errors
import pytest

from tests.e2e.conftest import DEFAULT_IMAGE
from tests.e2e.serve import KvmcServe

pytestmark = pytest.mark.e2e


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _untar(chunks) -> dict[str, bytes]:  # noqa: ANN001 - docker-py's stream of bytes
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _names(client: docker.DockerClient) -> set[str]:
    return {c.name for c in client.containers.list(all=True)}


def test_run_returns_output_and_raises_container_error(kvmc_serve: KvmcServe) -> None:
    client = kvmc_serve.client()
    try:
        out = client.containers.run(DEFAULT_IMAGE, ["sh", "-c", "echo hello; echo not-in-output >&2"],
                                    name="dpy-run", remove=True)
        assert out == b"hello\n"
        with pytest.raises(docker.errors.ContainerError) as failed:
            client.containers.run(DEFAULT_IMAGE, "cat /test", name="dpy-err", remove=True)
        assert failed.value.exit_status == 1
        assert b"No such file or directory" in failed.value.stderr
        assert failed.value.image == DEFAULT_IMAGE
        assert not {"dpy-run", "dpy-err"} & _names(client)  # remove=True removed both
    finally:
        for name in ("dpy-run", "dpy-err"):
            try:
                client.containers.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
        client.close()


PAUSE = "sleep 0.5"
WORKER = "echo first; while [ ! -e /root/stop ]; do sleep 0.2; done; echo last; exit 5"


def test_detached_exec_archive_logs_wait_remove(kvmc_serve: KvmcServe) -> None:
    client = kvmc_serve.client()
    container = client.containers.run(DEFAULT_IMAGE, ["sh", "-c", WORKER], name="dpy-worker", detach=True)
    sleeper = None
    try:
        assert container.status in ("created", "running")
        container.reload()
        assert container.status == "running"
        assert container.attrs["HostConfig"]["LogConfig"]["Type"] == "json-file"

        # Each exec sleeps before its first output: docker-py reads a hijacked stream from the
        # raw socket, under the buffered reader that parsed the 101, so output that arrives
        # with the response headers is lost (docker/docker-py#2042, #3332; dockerd too).
        code, output = container.exec_run(["sh", "-c", f"{PAUSE}; echo from-exec; echo to-err >&2; exit 3"])
        assert code == 3
        assert b"from-exec\n" in output and b"to-err\n" in output
        code, output = container.exec_run(["sh", "-c", f"{PAUSE}; cat /root/nothing-here"])
        assert code == 1 and b"No such file or directory" in output

        # put_archive / get_archive round trip
        assert container.put_archive("/root", _tar({"data.txt": b"round trip\n", "sub/n.txt": b"nested\n"}))
        code, output = container.exec_run(["sh", "-c", f"{PAUSE}; cat /root/data.txt /root/sub/n.txt"])
        assert code == 0 and output == b"round trip\nnested\n"
        chunks, stat = container.get_archive("/root/data.txt")
        assert stat["name"] == "data.txt" and stat["size"] == len(b"round trip\n")
        assert _untar(chunks) == {"data.txt": b"round trip\n"}
        chunks, stat = container.get_archive("/root/sub")
        assert stat["name"] == "sub"
        assert _untar(chunks) == {"sub/n.txt": b"nested\n"}

        # a followed log stream: the line so far, then (once the file below stops the loop)
        # the last line, then the end of the stream when the process exits
        stream = container.logs(stream=True, follow=True)
        try:
            assert next(stream) == b"first\n"
            assert container.put_archive("/root", _tar({"stop": b""}))
            rest = b"".join(stream)
        finally:
            stream.close()
        assert rest == b"last\n"
        assert container.wait(timeout=120) == {"StatusCode": 5, "Error": None}
        container.reload()
        assert container.status == "exited" and container.attrs["State"]["ExitCode"] == 5
        assert container.logs() == b"first\nlast\n"

        # remove(force=True) of a running container
        sleeper = client.containers.run(DEFAULT_IMAGE, "sleep 300", name="dpy-sleeper", detach=True)
        sleeper.reload()
        assert sleeper.status == "running"
        sleeper.remove(force=True)
        with pytest.raises(docker.errors.NotFound):
            client.containers.get("dpy-sleeper")
        container.remove()
        assert not {"dpy-worker", "dpy-sleeper"} & _names(client)
    finally:
        for name in ("dpy-worker", "dpy-sleeper"):
            try:
                client.containers.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
        client.close()


def test_images_and_volumes(kvmc_serve: KvmcServe) -> None:
    client = kvmc_serve.client()
    try:
        images = client.images.list()
        assert any(DEFAULT_IMAGE in image.tags for image in images), [i.tags for i in images]
        default = client.images.get(DEFAULT_IMAGE)
        assert default.id.startswith("sha256:") and DEFAULT_IMAGE in default.tags
        assert client.images.get(default.id).id == default.id

        volume = client.volumes.create("dpy-vol", labels={"made-by": "dpy"})
        try:
            assert volume.name == "dpy-vol" and volume.attrs["Driver"] == "local"
            assert "dpy-vol" in {v.name for v in client.volumes.list()}
            assert client.volumes.get("dpy-vol").attrs["Labels"] == {"made-by": "dpy"}
        finally:
            volume.remove()
        assert "dpy-vol" not in {v.name for v in client.volumes.list()}
        with pytest.raises(docker.errors.NotFound):
            client.volumes.get("dpy-vol")
    finally:
        client.close()
