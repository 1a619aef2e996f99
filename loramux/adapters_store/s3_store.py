"""Adapters in an S3-compatible bucket, shared by every replica, cached on local disk.

Layout under `s3://bucket/prefix/`:
- `objects/<name>/<version>/adapter_config.json`, `.../adapter_model.safetensors`:
  one immutable copy per upload (`version` = upload time in ns + a random tag);
- `manifests/<name>.json`: the version to serve, the sha256 of both files and
  the card (description, examples). It is written last, in one PUT, so a
  reader that sees a manifest finds complete files; readers verify the
  checksums anyway and refuse a copy that does not match.

Deleting removes the manifest first (readers stop seeing the adapter), then
the version's objects. Replacing writes the new version, then the manifest,
then removes the old version's objects. Uploads without `replace` use a
conditional PUT (`If-None-Match: *`), so of two concurrent creators one wins
and the other gets `already_exists`; with `replace` the last manifest wins
and the loser removes its own objects (or, when both saw themselves
published, a later upload removes them after ORPHAN_GRACE_SECONDS).

The local cache holds `<cache_dir>/<name>/<version>/` PEFT folders, written
atomically (`stage_adapter_dir` then `commit_adapter_dir`); the engine reads them like any folder.
Credentials and region come from the usual AWS environment and config files;
`endpoint_url` (or `AWS_ENDPOINT_URL`) points at MinIO and the like.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loramux.adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from loramux.adapters_store.registry import check_metadata, check_name, commit_adapter_dir, stage_adapter_dir

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
ORPHAN_GRACE_SECONDS = 3600.0  # older unpublished versions are leftovers of lost races or crashed uploads
VERSION_KEY = "s3_version"  # in the cached folder's card: which version the folder holds


class AdapterStoreUnavailable(AdapterError):
    """The object store cannot be reached; what the local cache holds keeps serving."""

    def __init__(self, message: str):
        super().__init__("store_unavailable", message)


def is_s3_url(value: str | None) -> bool:
    return bool(value) and value.startswith(S3_SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not is_s3_url(url):
        raise ValueError(f"an S3 adapter store is s3://BUCKET[/PREFIX], got {url!r}")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket")
    return bucket, prefix.strip("/")


@dataclass(frozen=True)
class AdapterManifest:
    """What `manifests/<name>.json` says: the version to serve and how to check it."""

    name: str
    version: str
    config_sha256: str
    weights_sha256: str
    weights_bytes: int
    description: str = ""
    examples: list[str] = field(default_factory=list)
    created: float = 0.0

    @property
    def card(self) -> dict:
        return {"description": self.description, "examples": list(self.examples), VERSION_KEY: self.version}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class S3AdapterStore:
    """Reads and writes adapters in one bucket prefix; keeps verified copies in `cache_dir`."""

    def __init__(self, url: str, cache_dir: str | Path, endpoint_url: str | None = None,
                 connect_timeout: float = 3.0, read_timeout: float = 30.0, client=None):
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url,
            config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                          retries={"max_attempts": 2, "mode": "standard"}))
        self.endpoint = endpoint_url or self.client.meta.endpoint_url

    # ------------------------------------------------------------ keys
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _manifest_key(self, name: str) -> str:
        return self._key("manifests", f"{name}.json")

    def _object_key(self, name: str, version: str, filename: str) -> str:
        return self._key("objects", name, version, filename)

    def _call(self, what: str, fn, *args, **kwargs):
        """One S3 call; an unreachable endpoint or a missing bucket become clear errors."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise AdapterStoreUnavailable(f"the adapter store {self.url} refused to {what}: {code} "
                                              f"({exc})") from exc
            raise
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise AdapterStoreUnavailable(f"the adapter store {self.url} at {self.endpoint} is unreachable "
                                          f"({what}): {exc}") from exc

    # ------------------------------------------------------------ reading
    def manifests(self) -> dict[str, AdapterManifest]:
        """Every adapter the bucket serves now, by name (one LIST plus one GET per manifest)."""
        found: dict[str, AdapterManifest] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list adapters", lambda: list(paginator.paginate(
            Bucket=self.bucket, Prefix=self._key("manifests") + "/")))
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1].removesuffix(".json")
                manifest = self.manifest(name)
                if manifest is not None:
                    found[name] = manifest
        return found

    def manifest(self, name: str) -> AdapterManifest | None:
        """The manifest of `name`, or None when it is not (or no longer) in the bucket."""
        from botocore.exceptions import ClientError

        try:
            body = self._call(f"read the manifest of {name!r}", self.client.get_object,
                              Bucket=self.bucket, Key=self._manifest_key(name))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            return AdapterManifest(**json.loads(body))
        except (json.JSONDecodeError, TypeError) as exc:
            raise AdapterError("corrupt", f"the manifest of adapter {name!r} in {self.url} is not valid: {exc}") \
                from exc

    def fetch(self, manifest: AdapterManifest) -> Path:
        """The verified local folder of `manifest`'s version, downloaded on first use.

        Raises AdapterError("corrupt") when the objects do not match the manifest's checksums.
        """
        name, version = manifest.name, manifest.version
        check_name(name)
        check_name(version)
        folder = self.cache_dir / name / version
        if (folder / WEIGHTS_FILE).is_file():
            return folder
        from botocore.exceptions import ClientError

        files = {}
        for filename, digest in ((CONFIG_FILE, manifest.config_sha256), (WEIGHTS_FILE, manifest.weights_sha256)):
            try:
                data = self._call(f"download {name!r}", self.client.get_object, Bucket=self.bucket,
                                  Key=self._object_key(name, version, filename))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                    raise
                raise AdapterError("not_found", f"adapter {name!r} version {version} is no longer in {self.url} "
                                                "(replaced or deleted meanwhile)") from exc
            if _sha256(data) != digest:
                raise AdapterError("corrupt", f"adapter {name!r} version {version}: {filename} in {self.url} "
                                              f"does not match its manifest's sha256; refusing it")
            files[filename] = data
        folder = self.cache_dir / name
        folder.mkdir(exist_ok=True)
        staged = stage_adapter_dir(folder, version, files[CONFIG_FILE], files[WEIGHTS_FILE], manifest.card)
        return commit_adapter_dir(folder, version, staged)

    def cached(self) -> dict[str, Path]:
        """The newest complete cached folder of every adapter (what serves while the store is unreachable)."""
        newest = {}
        for adapter_dir in sorted(p for p in self.cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = sorted(v for v in adapter_dir.iterdir()
                              if v.is_dir() and not v.name.startswith(".") and (v / WEIGHTS_FILE).is_file())
            if versions:
                newest[adapter_dir.name] = versions[-1]
        return newest

    def drop_cached(self, name: str, keep: str | None = None) -> None:
        """Remove cached versions of `name` other than `keep` (all of them when None).

        Dot-folders stay: a `.tmp-*` one is another download's staging folder, still being written.
        """
        adapter_dir = self.cache_dir / name
        if not adapter_dir.is_dir():
            return
        for version in adapter_dir.iterdir():
            if version.name != keep and not version.name.startswith("."):
                shutil.rmtree(version, ignore_errors=True)
        if keep is None:
            try:
                adapter_dir.rmdir()
            except OSError:  # a download is staging a version in it
                pass

    # ------------------------------------------------------------ writing
    def upload(self, name: str, config_bytes: bytes, weights_bytes: bytes, metadata: dict | None = None,
               replace: bool = False) -> AdapterManifest:
        """Write a new version, then its manifest. The caller has validated the files against the model."""
        from botocore.exceptions import ClientError

        check_name(name)
        description, examples = check_metadata(metadata or {})
        version = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        manifest = AdapterManifest(name=name, version=version, config_sha256=_sha256(config_bytes),
                                   weights_sha256=_sha256(weights_bytes), weights_bytes=len(weights_bytes),
                                   description=description, examples=examples, created=time.time())
        previous = self.manifest(name)
        if previous is not None and not replace:
            raise AdapterError("already_exists", f"adapter {name!r} already exists (replacing needs replace=true)")
        for filename, data in ((CONFIG_FILE, config_bytes), (WEIGHTS_FILE, weights_bytes)):
            self._call(f"upload {name!r}", self.client.put_object, Bucket=self.bucket,
                       Key=self._object_key(name, version, filename), Body=data)
        condition = {} if replace else {"IfNoneMatch": "*"}
        try:
            self._call(f"publish {name!r}", self.client.put_object, Bucket=self.bucket,
                       Key=self._manifest_key(name), Body=json.dumps(asdict(manifest)).encode(),
                       ContentType="application/json", **condition)
        except ClientError as exc:
            self._delete_version(name, version)
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise AdapterError("already_exists", f"adapter {name!r} was created by another upload") from exc
            raise
        current = self.manifest(name)
        if current is None or current.version != version:  # a concurrent replace won: our copy serves no one
            self._delete_version(name, version)
        if previous is not None and previous.version != version:
            self._delete_version(name, previous.version)
        self._delete_orphans(name, keep=current.version if current else version)
        logger.info("adapter %s: version %s published to %s", name, version, self.url)
        return manifest

    def delete(self, name: str) -> None:
        """Unpublish (readers stop seeing it at once), then remove the version's objects."""
        manifest = self.manifest(name)
        if manifest is None:
            raise AdapterError("not_found", f"adapter {name!r} does not exist in {self.url}")
        self._call(f"delete {name!r}", self.client.delete_object, Bucket=self.bucket, Key=self._manifest_key(name))
        self._delete_version(name, manifest.version)

    def _delete_orphans(self, name: str, keep: str) -> None:
        """Remove versions of `name` that no manifest names and that no upload still in progress can own.

        Two replacing uploads can both see themselves published and leave the loser's objects behind;
        anything older than ORPHAN_GRACE_SECONDS is past any upload and is removed by the next one.
        """
        listing = self._call(f"list the versions of {name!r}", self.client.list_objects_v2, Bucket=self.bucket,
                             Prefix=self._key("objects", name) + "/", Delimiter="/")
        cutoff = time.time_ns() - int(ORPHAN_GRACE_SECONDS * 1e9)
        for entry in listing.get("CommonPrefixes", []):
            version = entry["Prefix"].rstrip("/").rsplit("/", 1)[-1]
            stamp = version.partition("-")[0]
            if version != keep and stamp.isdigit() and int(stamp) < cutoff:
                self._delete_version(name, version)

    def _delete_version(self, name: str, version: str) -> None:
        keys = [{"Key": self._object_key(name, version, f)} for f in (CONFIG_FILE, WEIGHTS_FILE)]
        self._call(f"delete an old version of {name!r}", self.client.delete_objects, Bucket=self.bucket,
                   Delete={"Objects": keys, "Quiet": True})

