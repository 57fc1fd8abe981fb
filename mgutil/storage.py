"""One interface over the two output locations: a local folder and an S3 prefix.

Keys are relative, ``/``-separated paths such as ``song-1a2b3c4d.wav`` or
``records/song-1a2b3c4d.json``. Both stores promise that a stored object is never
half-written: the local store writes a temporary file and renames it, and the S3 store
counts an upload only after HEAD reports the expected size.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from mgutil.config import parse_output_uri
from mgutil.errors import StorageError, StoragePermissionError

logger = logging.getLogger(__name__)

WAV_CONTENT_TYPE = "audio/wav"
# Prefix of in-progress local writes; list_keys() never returns them.
_TEMP_PREFIX = ".tmp-"
# Tries per S3 call, the first included (botocore's total_max_attempts), retried by its
# standard retry mode with backoff.
S3_MAX_ATTEMPTS = 10
# Attempts of a whole upload in S3Store.put_file, each with botocore's own retries.
# The backoff between them is 2 s, 4 s, 8 s (at most 30 s), each shortened by up to half
# at random, so that workers throttled together do not retry together.
UPLOAD_ATTEMPTS = 4
UPLOAD_BACKOFF_S = 2.0
UPLOAD_BACKOFF_MAX_S = 30.0
# Responses after which a later try may succeed: server errors and throttling, as in
# botocore's standard retry mode (botocore/retries/standard.py).
_TRANSIENT_STATUS_CODES = (500, 502, 503, 504, 429)
_TRANSIENT_ERROR_CODES = (
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
)
# Error codes of a conditional S3 write whose condition did not hold: 412, and 409 when
# another conditional write to the same key was in flight at the same moment.
_CONDITION_FAILED_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
# Codes of a server that does not implement a conditional header.
_NOT_IMPLEMENTED_CODES = ("NotImplemented", "501")


@dataclass(frozen=True)
class Versioned:
    """The content of a stored object and its version.

    Attributes:
        data: The object's bytes.
        version: An opaque version string: the ETag on S3, a SHA-256 of the content in a
            local folder. It changes whenever the content changes.
    """

    data: bytes
    version: str


class Store(ABC):
    """An output location: songs, records and reports under relative keys."""

    uri: str

    @abstractmethod
    def check_ready(self) -> None:
        """Check that the location exists and can be reached; raise StorageError if not."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether ``key`` is stored.

        Raises:
            StoragePermissionError: Access was denied, so existence is unknown.
            StorageError: Any other failure; never reported as "exists" or "missing".
        """

    @abstractmethod
    def put_file(self, local_path: str | Path, key: str, content_type: str) -> None:
        """Store a local file under ``key``, replacing any object already there."""

    @abstractmethod
    def put_bytes(self, data: bytes, key: str, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing any object already there."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the content of ``key``."""

    @abstractmethod
    def download_file(self, key: str, local_path: str | Path) -> None:
        """Copy ``key`` to a local file."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Return every key that starts with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def location_of(self, key: str) -> str:
        """Return the full URI or path of ``key``, for messages and logs."""
        return f"{self.uri.rstrip('/')}/{key}"

    # Conditional writes, for claims that several workers race for. Each caller should
    # write content unique to itself (a claim contains a random token): a retried request
    # that finds its own bytes in place counts as its success.

    def create_exclusive(self, key: str, data: bytes, content_type: str) -> bool:
        """Store ``data`` under ``key`` only if nothing is stored there yet.

        Returns:
            ``True`` if this call created the object, ``False`` if ``key`` already existed.

        Raises:
            StorageError: The write failed for another reason, or the server does not
                support conditional writes.
        """
        return self.put_if_absent(key, data, content_type) is not None

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str | None:
        """Like :meth:`create_exclusive`, but return the new object's version, or ``None``."""

    @abstractmethod
    def get_versioned(self, key: str) -> Versioned | None:
        """Return the content and version of ``key``, or ``None`` when it is missing."""

    @abstractmethod
    def replace_if_version(
        self, key: str, data: bytes, content_type: str, version: str
    ) -> str | None:
        """Replace ``key`` with ``data`` only if its version is still ``version``.

        Returns:
            The new version, or ``None`` when the object changed or vanished meanwhile.
        """

    @abstractmethod
    def delete_if_version(self, key: str, version: str) -> bool:
        """Remove ``key`` only if its version is still ``version``.

        Returns:
            ``True`` if this call removed it, ``False`` when it changed or vanished meanwhile.
        """


class LocalStore(Store):
    """A folder on this machine."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"key {key!r} points outside the output folder {self.root}")
        return path

    def check_ready(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(
                f"cannot create the output folder {self.root}: {error}. "
                "Choose a writable folder with -p output_uri or MUSICGEN_OUTPUT_URI"
            ) from error
        if not os.access(self.root, os.W_OK):
            raise StorageError(
                f"the output folder {self.root} is not writable. "
                "Fix its permissions or choose another folder"
            )

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _write_atomically(self, key: str, write) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file lives in the target's folder, so the rename stays on one
        # file system and is atomic.
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            # mkstemp creates the file as 0600; give it the mode a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp_name, 0o666 & ~umask)
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def put_file(self, local_path: str | Path, key: str, content_type: str) -> None:
        def copy(handle):
            with open(local_path, "rb") as source:
                while chunk := source.read(1 << 20):
                    handle.write(chunk)

        self._write_atomically(key, copy)

    def put_bytes(self, data: bytes, key: str, content_type: str) -> None:
        self._write_atomically(key, lambda handle: handle.write(data))

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def download_file(self, key: str, local_path: str | Path) -> None:
        Path(local_path).write_bytes(self.get_bytes(key))

    def list_keys(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(_TEMP_PREFIX):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # Conditional writes. Creation links a finished temporary file to the key, which
    # fails if the key exists, so a reader never sees half a claim.
    # Replacing and deleting compare the content's digest under an exclusive flock on a
    # hidden lock file beside the key. The kernel releases the lock when its holder dies.

    @staticmethod
    def _digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def _lock_path(self, target: Path) -> Path:
        return target.parent / f"{_TEMP_PREFIX}lock-{target.name}"

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str | None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp_name, 0o666 & ~umask)
            try:
                os.link(temp_name, target)
            except FileExistsError:
                return None
        finally:
            Path(temp_name).unlink(missing_ok=True)
        return self._digest(data)

    def get_versioned(self, key: str) -> Versioned | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data, self._digest(data))

    def _locked_compare(self, key: str, version: str, action) -> bool:
        """Run ``action(target)`` under the key's lock if its digest is ``version``."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path(target), "ab") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    current = target.read_bytes()
                except FileNotFoundError:
                    return False
                if self._digest(current) != version:
                    return False
                action(target)
                return True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def replace_if_version(
        self, key: str, data: bytes, content_type: str, version: str
    ) -> str | None:
        replaced = self._locked_compare(
            key, version, lambda target: self.put_bytes(data, key, content_type)
        )
        return self._digest(data) if replaced else None

    def delete_if_version(self, key: str, version: str) -> bool:
        return self._locked_compare(key, version, lambda target: target.unlink())


class S3Store(Store):
    """A prefix in an S3 bucket, or in any S3-compatible server."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client=None,
        upload_attempts: int = UPLOAD_ATTEMPTS,
        upload_backoff_s: float = UPLOAD_BACKOFF_S,
    ):
        self.bucket = bucket
        self.prefix = prefix
        self.client = client if client is not None else make_s3_client()
        self.uri = f"s3://{bucket}/{prefix}"
        self.upload_attempts = max(int(upload_attempts), 1)
        self.upload_backoff_s = upload_backoff_s
        # Whole uploads that put_file tried again, over the life of this store.
        self.upload_retries = 0
        # S3 requests of this store's client that botocore's retry mode sent again.
        self.request_retries = 0
        events = getattr(getattr(self.client, "meta", None), "events", None)
        if events is not None:
            events.register("request-created.s3", self._count_request_try)

    def _count_request_try(self, request, **kwargs) -> None:
        # botocore numbers the tries of one call in the request context from 1.
        retries = getattr(request, "context", {}).get("retries") or {}
        if retries.get("attempt", 1) > 1:
            self.request_retries += 1
            logger.info(
                "S3 %s %s: try %s of %s",
                request.method,
                request.url.split("?", 1)[0],
                retries.get("attempt"),
                retries.get("max", "?"),
            )

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _error(self, error, action: str, key: str | None) -> StorageError:
        """Turn a botocore ClientError into a StorageError with the likely fix."""
        code = str(error.response.get("Error", {}).get("Code", "Unknown"))
        where = f"s3://{self.bucket}/{self._key(key)}" if key is not None else f"s3://{self.bucket}"
        if code in ("403", "AccessDenied", "Forbidden", "AllAccessDisabled"):
            return StoragePermissionError(
                f"{action} {where} failed: access denied (403). S3 returns 403 instead of 404 "
                f"for a missing key when the caller lacks s3:ListBucket, so grant s3:ListBucket, "
                f"s3:GetObject and s3:PutObject on bucket {self.bucket!r} to this role or user"
            )
        if code in ("NoSuchBucket",):
            return StorageError(
                f"{action} {where} failed: bucket {self.bucket!r} does not exist. "
                "Create it or fix MUSICGEN_OUTPUT_URI"
            )
        return StorageError(f"{action} {where} failed: {code}: {error}")

    def check_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist (or is in another account). "
                    "Create it or fix MUSICGEN_OUTPUT_URI"
                ) from error
            raise self._error(error, "checking bucket", None) from error
        except BotoCoreError as error:
            raise StorageError(f"cannot reach bucket {self.bucket!r}: {error}") from error

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if self._is_missing_key(error):
                return False
            raise self._error(error, "checking", key) from error
        except BotoCoreError as error:
            raise StorageError(f"checking {self.location_of(key)} failed: {error}") from error
        return True

    def _verify_size(self, key: str, expected: int) -> None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            raise self._error(error, "verifying upload of", key) from error
        stored = head.get("ContentLength")
        if stored != expected:
            raise StorageError(
                f"upload of {self.location_of(key)} is incomplete: stored {stored} bytes, "
                f"expected {expected}. Run again to upload it once more"
            )

    def _upload_once(self, local_path: str | Path, key: str, content_type: str, size: int) -> None:
        """Upload and verify once; raise _TransientUploadError when a retry may succeed."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # upload_file switches to a multipart upload for large files on its own.
            self.client.upload_file(
                str(local_path),
                self.bucket,
                self._key(key),
                ExtraArgs={"ContentType": content_type},
            )
        except S3UploadFailedError as error:
            # boto3 raises this while handling the ClientError, which it keeps as context.
            if isinstance(error.__context__, ClientError):
                if is_transient_error(error.__context__):
                    raise _TransientUploadError(str(error.__context__)) from error
                raise self._error(error.__context__, "uploading", key) from error
            raise StorageError(f"uploading {self.location_of(key)} failed: {error}") from error
        except ClientError as error:
            if is_transient_error(error):
                raise _TransientUploadError(str(error)) from error
            raise self._error(error, "uploading", key) from error
        except BotoCoreError as error:
            if is_transient_error(error):
                raise _TransientUploadError(str(error)) from error
            raise StorageError(f"uploading {self.location_of(key)} failed: {error}") from error
        try:
            self._verify_size(key, size)
        except StorageError as error:
            cause = error.__cause__
            if cause is None or is_transient_error(cause):
                # A short object or a failed HEAD: upload the whole file again.
                raise _TransientUploadError(str(error)) from error
            raise

    def put_file(self, local_path: str | Path, key: str, content_type: str) -> None:
        """Upload a local file; retry the whole upload on server errors and throttling.

        Each of ``upload_attempts`` attempts has botocore's own retries; between them
        the store waits ``upload_backoff_s`` seconds, doubled after each attempt. Every
        retry is logged and counted in ``upload_retries``.

        Raises:
            StorageError: The upload failed for good. The local file is left in place.
        """
        size = Path(local_path).stat().st_size
        for attempt in range(1, self.upload_attempts + 1):
            try:
                self._upload_once(local_path, key, content_type, size)
            except _TransientUploadError as error:
                if attempt == self.upload_attempts:
                    raise StorageError(
                        f"uploading {local_path} to {self.location_of(key)} failed "
                        f"{attempt} times, last: {error}. The local file is kept; run again "
                        "to upload it"
                    ) from error
                delay = min(self.upload_backoff_s * 2 ** (attempt - 1), UPLOAD_BACKOFF_MAX_S)
                delay *= random.uniform(0.5, 1.0)
                self.upload_retries += 1
                logger.warning(
                    "upload of %s failed on attempt %d of %d (%s); retrying in %.1f s",
                    self.location_of(key),
                    attempt,
                    self.upload_attempts,
                    error,
                    delay,
                )
                time.sleep(delay)
                continue
            if attempt > 1:
                logger.info(
                    "uploaded %s on attempt %d of %d",
                    self.location_of(key),
                    attempt,
                    self.upload_attempts,
                )
            return

    def put_bytes(self, data: bytes, key: str, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except ClientError as error:
            raise self._error(error, "writing", key) from error
        except BotoCoreError as error:
            raise StorageError(f"writing {self.location_of(key)} failed: {error}") from error
        self._verify_size(key, len(data))

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except ClientError as error:
            raise self._error(error, "reading", key) from error
        except BotoCoreError as error:
            raise StorageError(f"reading {self.location_of(key)} failed: {error}") from error

    def download_file(self, key: str, local_path: str | Path) -> None:
        Path(local_path).write_bytes(self.get_bytes(key))

    def list_keys(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        keys = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for item in page.get("Contents", []):
                    keys.append(item["Key"][len(self.prefix) :])
        except ClientError as error:
            raise self._error(error, "listing", prefix) from error
        except BotoCoreError as error:
            raise StorageError(f"listing {self.location_of(prefix)} failed: {error}") from error
        return sorted(keys)

    def delete(self, key: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            raise self._error(error, "deleting", key) from error

    # Conditional writes: If-None-Match: * creates only a missing key, If-Match: <ETag>
    # replaces or deletes only an unchanged one. AWS S3 supports both on PutObject and
    # If-Match on DeleteObject, which also needs s3:GetObject (S3 user guide,
    # "How to perform conditional deletes"). moto and SeaweedFS pass
    # tests/test_storage_backends.py.

    @staticmethod
    def _code(error) -> str:
        return str(error.response.get("Error", {}).get("Code", ""))

    @classmethod
    def _is_missing_key(cls, error) -> bool:
        """Return whether a ClientError means the key is missing (404), not the bucket.

        A HEAD response has no body, so its code may be the bare status ``404``.
        """
        code = cls._code(error)
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("404", "NoSuchKey", "NotFound") or (
            status == 404 and code != "NoSuchBucket"
        )

    def _unsupported(self, error, header: str, key: str) -> StorageError:
        return StorageError(
            f"s3://{self.bucket}/{self._key(key)}: the server does not support {header} "
            f"({self._code(error)}), which claims need so that two workers never take the "
            "same song. Use AWS S3 or a server that supports conditional writes, or run "
            "one worker only"
        )

    def _own_write(self, key: str, data: bytes) -> Versioned | None:
        """Return the object if it contains exactly ``data``, written by an earlier try of this call."""
        current = self.get_versioned(key)
        if current is not None and current.data == data:
            return current
        return None

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=content_type,
                IfNoneMatch="*",
            )
        except ClientError as error:
            code = self._code(error)
            if code in _CONDITION_FAILED_CODES:
                # botocore retries a request whose response was lost, and the retry then
                # finds the object that the first try created.
                own = self._own_write(key, data)
                return own.version if own is not None else None
            if code in _NOT_IMPLEMENTED_CODES:
                raise self._unsupported(error, "If-None-Match", key) from error
            raise self._error(error, "creating", key) from error
        except BotoCoreError as error:
            raise StorageError(f"creating {self.location_of(key)} failed: {error}") from error
        return response["ETag"]

    def get_versioned(self, key: str) -> Versioned | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return Versioned(response["Body"].read(), response["ETag"])
        except ClientError as error:
            if self._is_missing_key(error):
                return None
            raise self._error(error, "reading", key) from error
        except BotoCoreError as error:
            raise StorageError(f"reading {self.location_of(key)} failed: {error}") from error

    def replace_if_version(
        self, key: str, data: bytes, content_type: str, version: str
    ) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=content_type,
                IfMatch=version,
            )
        except ClientError as error:
            code = self._code(error)
            # A vanished key gives 404 on AWS and moto, 412 on SeaweedFS.
            if code in _CONDITION_FAILED_CODES or code in ("NoSuchKey", "404"):
                own = self._own_write(key, data)
                return own.version if own is not None else None
            if code in _NOT_IMPLEMENTED_CODES:
                raise self._unsupported(error, "If-Match", key) from error
            raise self._error(error, "replacing", key) from error
        except BotoCoreError as error:
            raise StorageError(f"replacing {self.location_of(key)} failed: {error}") from error
        return response["ETag"]

    def delete_if_version(self, key: str, version: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        current = self.get_versioned(key)
        if current is None or current.version != version:
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=version)
        except ClientError as error:
            code = self._code(error)
            if code in _CONDITION_FAILED_CODES or code in ("NoSuchKey", "404"):
                return False
            if code in _NOT_IMPLEMENTED_CODES:
                raise self._unsupported(error, "If-Match on DeleteObject", key) from error
            raise self._error(error, "deleting", key) from error
        except BotoCoreError as error:
            raise StorageError(f"deleting {self.location_of(key)} failed: {error}") from error
        return True


class _TransientUploadError(Exception):
    """An upload attempt failed, but another attempt may succeed."""


def is_transient_error(error: BaseException) -> bool:
    """Return whether a later try of the failed S3 request may succeed.

    True for server errors (5xx), throttling (429, ``SlowDown`` and similar codes), and
    botocore's connection errors (refused, reset or closed connections, timeouts).
    """
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_ERROR_CODES or status in _TRANSIENT_STATUS_CODES
    return isinstance(error, ConnectionError | HTTPClientError)


def make_s3_client(region: str | None = None, session=None):
    """Create an S3 client with botocore's standard retry mode.

    The boto3 session reads credentials, profiles and ``AWS_ENDPOINT_URL`` (for
    S3-compatible servers) from its usual sources; nothing here overrides them.
    """
    import boto3
    from botocore.config import Config

    session = session if session is not None else boto3.session.Session()
    config = Config(retries={"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS})
    return session.client("s3", region_name=region or session.region_name, config=config)


def open_store(uri: str, s3_client=None, region: str | None = None) -> Store:
    """Open the output location named by a folder path or an ``s3://bucket/prefix`` URI."""
    scheme, location, prefix = parse_output_uri(uri)
    if scheme == "s3":
        client = s3_client if s3_client is not None else make_s3_client(region)
        return S3Store(location, prefix, client)
    return LocalStore(location)
