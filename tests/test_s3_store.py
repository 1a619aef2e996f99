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


def two_mirrors(endpoint, engines, tmp_path) -> tuple[str, S3AdapterMirror, S3AdapterMirror]:
    """A new bucket, and a mirror of it for each engine (a writer and a reader)."""
    bucket = create_bucket(endpoint)
    return (bucket, fresh_mirror(engines[0], endpoint, bucket, tmp_path / "a"),
            fresh_mirror(engines[1], endpoint, bucket, tmp_path / "b"))


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
    _, writer, reader = two_mirrors(s3_endpoint, engines, tmp_path)
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
    bucket, writer, reader = two_mirrors(s3_endpoint, engines, tmp_path)
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
    bucket, writer, reader = two_mirrors(s3_endpoint, engines, tmp_path)
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
    # A restarted server over the same cache serves the cached version; a cached adapter it refuses
    # (here truncated weights) is logged and skipped, not a failed start.
    broken = tmp_path / "cache" / "broken" / "1-abc"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_bytes(adapter_files[0][0])
    (broken / "adapter_model.safetensors").write_bytes(adapter_files[0][1][:-100])
    restarted = make_engine(tiny_llama_dir)
    store = S3AdapterStore(f"s3://{bucket}/team/adapters", tmp_path / "cache", endpoint_url=endpoint)
    cold = S3AdapterMirror(store, engine_call(restarted))
    asyncio.run(cold.start())
    assert "unreachable" in cold.last_error
    assert greedy(restarted, "kept") == expected
    assert "broken" not in restarted.store and "broken" in cold.errors


def test_reserved_and_taken_names_are_refused_before_anything_is_written(s3_endpoint, engines, adapter_files,
                                                                         tmp_path, tiny_llama_dir):
    bucket = create_bucket(s3_endpoint)
    writer = fresh_mirror(engines[0], s3_endpoint, bucket, tmp_path / "a")
    for name in ("auto", engines[0].model_id):
        with pytest.raises(AdapterError) as exc:
            asyncio.run(writer.upload(name, *adapter_files[0], {}, replace=False))
        assert exc.value.code == "invalid_name", name
    local = tmp_path / "local"
    local.mkdir()
    for filename, data in zip(("adapter_config.json", "adapter_model.safetensors"), adapter_files[1]):
        (local / filename).write_bytes(data)
    engines[0].add_adapter("local-only", str(local))  # registered on this server, not from the bucket
    with pytest.raises(AdapterError) as exc:
        asyncio.run(writer.upload("local-only", *adapter_files[0], {}, replace=False))
    assert exc.value.code == "already_exists"
    assert bucket_keys(s3_endpoint, bucket) == []


def test_a_refused_version_is_not_fetched_again_until_the_manifest_changes(s3_endpoint, engines, adapter_files,
                                                                           tmp_path):
    bucket, writer, reader = two_mirrors(s3_endpoint, engines, tmp_path)
    asyncio.run(writer.upload("flaky", *adapter_files[0], {}, replace=False))
    manifest = writer.store.manifest("flaky")
    key = f"team/adapters/objects/flaky/{manifest.version}/adapter_model.safetensors"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key=key, Body=adapter_files[0][1][:-7])
    fetched = []
    fetch = reader.store.fetch
    reader.store.fetch = lambda m: fetched.append(m.version) or fetch(m)  # counts the downloads
    for _ in range(3):
        asyncio.run(reader.sync_once())
    assert fetched == [manifest.version] and reader.errors["flaky"].code == "corrupt"
    assert "flaky" not in engines[1].store
    asyncio.run(writer.upload("flaky", *adapter_files[1], {}, replace=True))  # a new version is tried
    asyncio.run(reader.sync_once())
    assert len(fetched) == 2 and engines[1].store.get("flaky").checksum == sha(adapter_files[1][1] + adapter_files[1][0])
    assert "flaky" not in reader.errors and "flaky" not in reader.refused


def test_a_version_refused_while_the_old_one_is_in_use_is_retried(s3_endpoint, engines, adapter_files, tmp_path):
    _, writer, reader = two_mirrors(s3_endpoint, engines, tmp_path)
    asyncio.run(writer.upload("busy", *adapter_files[0], {}, replace=False))
    asyncio.run(reader.sync_once())
    engines[1].store.acquire(["busy"])  # a running request uses the old version
    try:
        asyncio.run(writer.upload("busy", *adapter_files[1], {}, replace=True))
        asyncio.run(reader.sync_once())
        assert reader.errors["busy"].code == "in_use"
    finally:
        engines[1].store.release(["busy"])
    asyncio.run(reader.sync_once())
    assert engines[1].store.get("busy").checksum == sha(adapter_files[1][1] + adapter_files[1][0])


def test_registration_does_the_slow_part_off_the_engine_thread(s3_endpoint, engines, adapter_files, tmp_path,
                                                               monkeypatch):
    _, writer, reader = two_mirrors(s3_endpoint, engines, tmp_path)
    asyncio.run(writer.upload("offload", *adapter_files[2], {}, replace=False))
    engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")  # as AsyncEngine.call runs functions

    async def call(fn):
        return await asyncio.get_running_loop().run_in_executor(engine_thread, fn, engines[1])

    reader.call = call
    prepared_on = []
    prepare_path = engines[1].store.prepare_path
    monkeypatch.setattr(engines[1].store, "prepare_path",
                        lambda *a, **k: prepared_on.append(threading.current_thread().name) or prepare_path(*a, **k))
    asyncio.run(reader.sync_once())
    engine_thread.shutdown()
    assert "offload" in engines[1].store
    assert prepared_on and not any(name.startswith("engine") for name in prepared_on)


def test_polls_uploads_and_deletes_do_not_interleave(s3_endpoint, engines, adapter_files, tmp_path, monkeypatch):
    bucket = create_bucket(s3_endpoint)
    writer = fresh_mirror(engines[0], s3_endpoint, bucket, tmp_path / "a", prefix="race")
    installed = []  # every version the engine installs: a poll racing an upload must not install it twice
    install = engines[0].store.install
    monkeypatch.setattr(engines[0].store, "install",
                        lambda prepared: installed.append(prepared.record.path) or install(prepared))

    async def busy_engine_call(fn):  # the engine thread runs decode steps between calls
        await asyncio.sleep(0.02)
        return fn(engines[0])

    writer.call = busy_engine_call

    async def race():
        for round_ in range(4):
            names = [f"r{round_}-{i}" for i in range(2)]
            await asyncio.gather(*(writer.upload(n, *adapter_files[i], {}, replace=False)
                                   for i, n in enumerate(names)), *(writer.sync_once() for _ in range(4)))
            await asyncio.gather(*(writer.delete(n) for n in names), *(writer.sync_once() for _ in range(4)))

    asyncio.run(race())
    assert len(installed) == 8 and len(set(installed)) == 8
    assert writer.errors == {} and writer.served == {}
    assert not any(n.startswith("r") for n in engines[0].store.records)


def test_drop_cached_keeps_staging_folders(tmp_path, s3_endpoint):
    store = S3AdapterStore(f"s3://{create_bucket(s3_endpoint)}", tmp_path / "cache", endpoint_url=s3_endpoint)
    for folder in ("x/v1", "x/v2", "x/.tmp-x-abc"):
        (store.cache_dir / folder).mkdir(parents=True)
    store.drop_cached("x", keep="v2")
    assert sorted(p.name for p in (store.cache_dir / "x").iterdir()) == [".tmp-x-abc", "v2"]
    store.drop_cached("x")
    assert sorted(p.name for p in (store.cache_dir / "x").iterdir()) == [".tmp-x-abc"]
