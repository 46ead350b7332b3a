"""Remote paths in the Python API: ``load_file``, ``safe_open`` and ``Loader`` on ``http://`` and
``s3://`` URLs served by real servers on the loopback (nginx, moto's S3 server), against the
reference ``safetensors.numpy`` reading the local copies. Each server's tests skip with one line
when its program is missing, unless ``WEIGHTSTREAM_REQUIRE_SERVERS=1`` (CI) makes that a
failure."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import weightstream as ws

from conftest import reference

REQUIRE = os.environ.get("WEIGHTSTREAM_REQUIRE_SERVERS") == "1"


def _missing(what):
    if REQUIRE:
        pytest.fail(f"{what} (WEIGHTSTREAM_REQUIRE_SERVERS=1)")
    pytest.skip(what)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port, proc, log):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log).read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not answer on {port}: {Path(log).read_text()[-2000:]}")


@pytest.fixture(scope="module")
def nginx(gen):
    """nginx serving a copy of the generated files: yields the base URL."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe is None:
        _missing("SKIPPED: nginx not installed (apt-get install nginx; scripts/install_test_servers.sh)")
    root = Path(tempfile.mkdtemp(prefix="ws-nginx-"))
    www = root / "www"
    shutil.copytree(gen, www)
    port = _free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        f"""master_process off; daemon off; pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {root}/t; proxy_temp_path {root}/t;
  fastcgi_temp_path {root}/t; uwsgi_temp_path {root}/t; scgi_temp_path {root}/t;
  server {{ listen 127.0.0.1:{port}; root {www}; }} }}
"""
    )
    log = root / "stderr.log"
    proc = subprocess.Popen([exe, "-p", str(root), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        _wait_for(port, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(gen):
    """moto's standalone S3 server with the generated files under ``s3://ws-test/gen/``: yields
    the storage options that reach it."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        _missing("SKIPPED: moto_server not installed (pip install 'moto[server]'; scripts/install_test_servers.sh)")
    try:
        import boto3
    except ImportError:
        _missing("SKIPPED: boto3 not installed (it comes with moto[server])")
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="ws-moto-", suffix=".log")[1])
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        _wait_for(port, proc, log)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        client.create_bucket(Bucket="ws-test")
        for p in Path(gen).rglob("*.safetensors*"):
            client.upload_file(str(p), "ws-test", f"gen/{p.relative_to(gen).as_posix()}")
        yield {
            "aws_endpoint": endpoint,
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "aws_region": "us-east-1",
            "allow_http": True,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.unlink(missing_ok=True)


def _assert_equal(got, want):
    assert list(got) == list(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        assert got[name].shape == w.shape, name
        assert got[name].tobytes() == w.tobytes(), name


def test_load_file_over_http_equals_safetensors(nginx, gen):
    for name in ["mixed.safetensors", "dtype_bf16.safetensors", "dtype_f8_e4m3fn.safetensors", "empty_tensor.safetensors"]:
        got = ws.load_file(f"{nginx}/{name}", framework="np")
        _assert_equal(got, reference(gen / name))


def test_sharded_index_over_http_equals_safetensors(nginx, gen):
    got = ws.load_file(f"{nginx}/sharded/model.safetensors.index.json", framework="np")
    want = {}
    for shard in sorted((gen / "sharded").glob("*.safetensors")):
        want.update(reference(shard))
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].tobytes() == w.tobytes(), name


def test_safe_open_and_iterate_over_s3(s3, gen):
    url = "s3://ws-test/gen/mixed.safetensors"
    want = reference(gen / "mixed.safetensors")
    with ws.safe_open(url, framework="np", storage_options=s3) as f:
        assert sorted(f.keys()) == sorted(want)
        name = sorted(want)[0]
        assert f.get_tensor(name).tobytes() == want[name].tobytes()
    loader = ws.Loader(storage_options=s3, remote_request_size="64KiB", remote_concurrency=2)
    got = dict(loader.iterate("s3://ws-test/gen/sharded", framework="np", window="1MiB"))
    assert len(got) > 0
    assert ws.load_file("s3://ws-test/gen/sharded", framework="np", storage_options=s3).keys() == got.keys()


def test_remote_errors_name_the_url(nginx, s3):
    missing = f"{nginx}/no/such.safetensors"
    with pytest.raises(ws.RemoteError) as e:
        ws.load_file(missing, framework="np")
    assert missing in str(e.value)
    with pytest.raises(ws.UsageError):
        ws.load_file(f"{nginx}/mixed.safetensors", framework="np", storage_options={"no_such_option": "1"})
    with pytest.raises(ws.UsageError):
        ws.load_file(f"{nginx}/mixed.safetensors", framework="np", storage_options=["not", "a", "dict"])
    # (A refused credential is tested on the Rust side, where moto checks signatures.)
    with pytest.raises(OSError) as e:
        ws.load_file("s3://no-such-bucket-ws/m.safetensors", framework="np", storage_options=s3)
    assert "s3://no-such-bucket-ws/m.safetensors" in str(e.value)
