"""The S3 adapter store and its mirror against a real S3-protocol server (moto in server mode)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from loramux.adapters_store import AdapterError
from loramux.adapters_store.s3_mirror import S3AdapterMirror
from loramux.adapters_store.s3_store import AdapterStoreUnavailable, S3AdapterStore, parse_s3_url
from loramux.adapters_store.synthetic import write_random_adapter
from loramux.engine import SamplingParams
from tests.conftest import make_engine
from tests.s3_server import AWS_TEST_ENV, create_bucket, moto_s3_server

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def s3_endpoint():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_TEST_ENV.items():
            mp.setenv(key, value)
        with moto_s3_server() as endpoint:
            yield endpoint


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    return make_engine(tiny_llama_dir), make_engine(tiny_llama_dir)


@pytest.fixture(scope="module")
def adapter_files(tiny_llama_dir, tmp_path_factory, engines):
    """Four random adapters as (config bytes, weights bytes)."""
    root = tmp_path_factory.mktemp("s3-adapters")
    shape = engines[0].shape
    out = []
    for seed in range(4):
        folder = write_random_adapter(root / f"a{seed}", shape.lora_target_shapes(), shape.num_layers, rank=4,
                                      seed=seed, targets=("q_proj", "v_proj"), b_std=0.5)
        out.append(((folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()))
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def engine_call(engine):
    async def call(fn):
        return fn(engine)
    return call


def fresh_mirror(engine, endpoint, bucket, cache: Path, prefix="team/adapters") -> S3AdapterMirror:
    for name in list(engine.store.records):  # module-scoped engines: start every test from an empty registry
        engine.remove_adapter(name)
    store = S3AdapterStore(f"s3://{bucket}/{prefix}", cache, endpoint_url=endpoint)
    return S3AdapterMirror(store, engine_call(engine), poll_seconds=0.1)


def greedy(engine, adapter: str) -> list[int]:
    [[out]] = engine.generate([PROMPT], GREEDY, [[adapter]])
    return out.new_token_ids


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_parse_s3_url():
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        parse_s3_url("/local/dir")


def test_upload_is_seen_by_a_second_store_instance(s3_endpoint, engines, adapter_files, tmp_path):
    bucket = create_bucket(s3_endpoint)
    writer = fresh_mirror(engines[0], s3_endpoint, bucket, tmp_path / "a")
    reader = fresh_mirror(engines[1], s3_endpoint, bucket, tmp_path / "b")
    config, weights = adapter_files[0]
    asyncio.run(writer.upload("math", config, weights, {"description": "adds numbers"}, replace=False))
    assert "math" in engines[0].store  # the uploading server serves it at once
    assert "math" not in engines[1].store
    asyncio.run(reader.sync_once())
    record = engines[1].store.get("math")
    assert record.checksum == sha(weights + config) and record.description == "adds numbers"  # both PEFT files
    assert greedy(engines[1], "math") == greedy(engines[0], "math")
    assert greedy(engines[1], "math") != engines[1].generate([PROMPT], GREEDY)[0][0].new_token_ids
    # A second upload of the name without replace is refused and changes nothing.
    with pytest.raises(AdapterError) as exc:
        asyncio.run(writer.upload("math", *adapter_files[1], {}, replace=False))
    assert exc.value.code == "already_exists"
    assert reader.store.manifest("math").weights_sha256 == sha(weights)


def test_invalid_upload_is_refused_before_anything_is_written(s3_endpoint, engines, adapter_files, tmp_path):
    bucket = create_bucket(s3_endpoint)
    writer = fresh_mirror(engines[0], s3_endpoint, bucket, tmp_path / "a")
    config, weights = adapter_files[0]
    with pytest.raises(AdapterError):
        asyncio.run(writer.upload("bad", config, weights[:-100], {}, replace=False))
    with pytest.raises(AdapterError) as exc:
        asyncio.run(writer.upload("../escape", config, weights, {}, replace=False))
    assert exc.value.code == "invalid_name"
    assert bucket_keys(s3_endpoint, bucket) == []


def test_concurrent_uploads_of_one_name(s3_endpoint, adapter_files, tmp_path):
    bucket = create_bucket(s3_endpoint)
    url = f"s3://{bucket}/p"
    stores = [S3AdapterStore(url, tmp_path / f"c{i}", endpoint_url=s3_endpoint) for i in range(4)]
    barrier = threading.Barrier(4)

    def create(i):
        barrier.wait()
        try:
            stores[i].upload("same", *adapter_files[i], {}, replace=False)
            return "ok"
        except AdapterError as exc:
            return exc.code

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(create, range(4)))
    assert sorted(results) == ["already_exists"] * 3 + ["ok"]
    winner = results.index("ok")
    assert stores[0].manifest("same").weights_sha256 == sha(adapter_files[winner][1])

    def replace(i):
        barrier.wait()
        return stores[i].upload("same", *adapter_files[i], {}, replace=True).version

    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(replace, range(4)))
    final = stores[0].manifest("same")
    assert final.version in versions
    # The served version's objects are complete (a lost race may leave a loser's copy until it is old);
    # a reader gets the bytes of one whole upload.
    objects = [k for k in bucket_keys(s3_endpoint, bucket) if "/objects/" in k]
    assert {f"p/objects/same/{final.version}/{f}" for f in ("adapter_config.json", "adapter_model.safetensors")} \
        <= set(objects)
    assert {k.split("/")[3] for k in objects} <= set(versions)
    folder = S3AdapterStore(url, tmp_path / "reader", endpoint_url=s3_endpoint).fetch(final)
    i = versions.index(final.version)
    assert (folder / "adapter_model.safetensors").read_bytes() == adapter_files[i][1]
    assert (folder / "adapter_config.json").read_bytes() == adapter_files[i][0]


def test_a_reader_during_uploads_sees_only_whole_adapters(s3_endpoint, adapter_files, tmp_path):
    bucket = create_bucket(s3_endpoint)
    url = f"s3://{bucket}"
    writer = S3AdapterStore(url, tmp_path / "w", endpoint_url=s3_endpoint)
    reader = S3AdapterStore(url, tmp_path / "r", endpoint_url=s3_endpoint)
    uploaded = {sha(w): (c, w) for c, w in adapter_files}
    done = threading.Event()

    def upload_many():
        for round_ in range(3):
            for config, weights in adapter_files:
                writer.upload("busy", config, weights, {}, replace=True)
        done.set()

    thread = threading.Thread(target=upload_many)
    thread.start()
    seen, superseded = 0, 0
    while not done.is_set():
        manifest = reader.manifests().get("busy")
        if manifest is None:
            continue
        try:
            folder = reader.fetch(manifest)
        except AdapterError as exc:  # the version was replaced between reading the manifest and its files
            assert exc.code == "not_found", exc
            superseded += 1
            continue
        config, weights = uploaded[manifest.weights_sha256]
        assert (folder / "adapter_model.safetensors").read_bytes() == weights
        assert (folder / "adapter_config.json").read_bytes() == config
        seen += 1
    thread.join()
    assert seen > 0
    assert not list(reader.cache_dir.glob("**/.tmp-*"))


def test_delete_is_seen_by_every_mirror(s3_endpoint, engines, adapter_files, tmp_path):
    bucket = create_bucket(s3_endpoint)
    writer = fresh_mirror(engines[0], s3_endpoint, bucket, tmp_path / "a")
    reader = fresh_mirror(engines[1], s3_endpoint, bucket, tmp_path / "b")
    asyncio.run(writer.upload("gone", *adapter_files[2], {}, replace=False))
    asyncio.run(reader.sync_once())
    assert "gone" in engines[1].store
    asyncio.run(writer.delete("gone"))
    assert "gone" not in engines[0].store
    assert bucket_keys(s3_endpoint, bucket) == []

    async def poll_until_gone():  # the mirror's own loop, as a server runs it
        task = asyncio.create_task(reader.run())
        for _ in range(100):
            if "gone" not in engines[1].store:
                break
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(poll_until_gone())
    assert "gone" not in engines[1].store
    with pytest.raises(AdapterError) as exc:
        asyncio.run(writer.delete("gone"))
    assert exc.value.code == "not_found"


def test_a_corrupt_object_is_refused(s3_endpoint, engines, adapter_files, tmp_path):
    bucket = create_bucket(s3_endpoint)
    writer = fresh_mirror(engines[0], s3_endpoint, bucket, tmp_path / "a")
    reader = fresh_mirror(engines[1], s3_endpoint, bucket, tmp_path / "b")
    asyncio.run(writer.upload("fine", *adapter_files[0], {}, replace=False))
    asyncio.run(writer.upload("broken", *adapter_files[1], {}, replace=False))
    manifest = writer.store.manifest("broken")
    key = f"team/adapters/objects/broken/{manifest.version}/adapter_model.safetensors"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key=key, Body=adapter_files[1][1][:-7])
    asyncio.run(reader.sync_once())
    assert "fine" in engines[1].store and "broken" not in engines[1].store
    assert reader.errors["broken"].code == "corrupt" and "sha256" in str(reader.errors["broken"])
    assert not (reader.store.cache_dir / "broken" / manifest.version).exists()
    # A manifest that is not JSON is refused with a clear error too.
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key="team/adapters/manifests/fine.json", Body=b"{not json")
    with pytest.raises(AdapterError) as exc:
        reader.store.manifest("fine")
    assert exc.value.code == "corrupt"


def test_unreachable_store_gives_clear_errors_and_the_cache_keeps_serving(tiny_llama_dir, adapter_files, tmp_path,
                                                                          engines):
    with moto_s3_server() as endpoint:
        bucket = create_bucket(endpoint)
        mirror = fresh_mirror(engines[0], endpoint, bucket, tmp_path / "cache")
        asyncio.run(mirror.upload("kept", *adapter_files[3], {}, replace=False))
        expected = greedy(engines[0], "kept")
    # The server is gone now.
    with pytest.raises(AdapterStoreUnavailable) as exc:
        asyncio.run(mirror.sync_once())
    assert "unreachable" in str(exc.value) and endpoint in str(exc.value)
    assert greedy(engines[0], "kept") == expected  # what the engine has keeps serving
    with pytest.raises(AdapterStoreUnavailable):
        asyncio.run(mirror.upload("new", *adapter_files[0], {}, replace=False))
    # A restarted server over the same cache serves the cached version.
    restarted = make_engine(tiny_llama_dir)
    store = S3AdapterStore(f"s3://{bucket}/team/adapters", tmp_path / "cache", endpoint_url=endpoint)
    cold = S3AdapterMirror(store, engine_call(restarted))
    asyncio.run(cold.start())
    assert "unreachable" in cold.last_error
    assert greedy(restarted, "kept") == expected
