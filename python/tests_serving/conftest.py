"""Shared pieces of the serving tiers (vLLM, SGLang), run in ``.venv-serving``: tiny real
checkpoints written by transformers' ``save_pretrained`` with random weights, and a loopback S3
server (moto) with a checkpoint uploaded. Nothing here imports a serving framework: each test
file imports its own at the top, so that a missing framework fails that file."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def free_port():
    """A TCP port free on the loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port, proc, log, what):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {Path(log).read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer on port {port}: {Path(log).read_text()[-2000:]}")


def tiny_llama_config(**overrides):
    """A Llama small enough to build in a second, with every kind of weight a real one has
    (stacked q/k/v and gate/up in vLLM, GQA, norms, embeddings, an lm_head)."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_llama(path, *, dtype="float32", seed=0, max_shard_size=None, **config):
    """Write a random ``LlamaForCausalLM`` with ``save_pretrained`` (safetensors) to ``path``;
    returns ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config))
    # transformers initialises norms to ones: randomise them too, so that every tensor tells
    # whether it was loaded.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return Path(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A float32 tiny Llama in one ``model.safetensors``."""
    return save_llama(tmp_path_factory.mktemp("llama-f32"))


@pytest.fixture(scope="session")
def llama_sharded_dir(tmp_path_factory):
    """A float32 tiny Llama in several shards with ``model.safetensors.index.json``."""
    d = save_llama(tmp_path_factory.mktemp("llama-sharded"), seed=1, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) >= 3
    return d


@pytest.fixture(scope="session")
def llama_bf16_dir(tmp_path_factory):
    """A bfloat16 tiny Llama with tied embeddings."""
    return save_llama(tmp_path_factory.mktemp("llama-bf16"), dtype="bfloat16", seed=2, tie_word_embeddings=True)


def moto_server_exe():
    """moto's standalone S3 server of this venv (``pip install 'moto[server]'``), or None."""
    exe = Path(sys.executable).parent / "moto_server"
    return exe if exe.exists() else None


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on the loopback: yields ``(client, storage_options)``. A missing moto
    fails (the serving tiers require it), it does not skip."""
    exe = moto_server_exe()
    if exe is None:
        pytest.fail(f"moto_server not found next to {sys.executable}: pip install 'moto[server]'")
    import boto3

    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ws-moto-", suffix=".log")[1])
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=open(log, "w")
    )
    try:
        _wait_for(port, proc, log, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
            region_name="us-east-1",
        )
        yield client, {
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


def upload(client, bucket, prefix, directory, pattern="*.safetensors*"):
    """Upload ``directory``'s files matching ``pattern`` to ``s3://bucket/prefix/``."""
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for p in sorted(Path(directory).glob(pattern)):
        client.upload_file(str(p), bucket, f"{prefix}/{p.name}")


def config_only_copy(src, dst):
    """``src`` without its weights: what MODEL names when the weights come from elsewhere."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(p, dst / p.name)
    return dst
