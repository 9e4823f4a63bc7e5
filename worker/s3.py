"""S3 access for the archive: the client built from ``[archive]`` settings and
the three calls the worker makes (put, list, delete), failures translated.

Credentials, first match wins: the access keys (environment only); else
``role_arn``, assumed through STS with the default chain as the caller and
refreshed by botocore before the temporary credentials expire; else the
default chain itself (``AWS_*`` variables, web identity, instance profile). No
key, secret or session token ever appears in a log line or an error message:
errors carry the operation, the bucket and key, the S3 error code and status,
and what to change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.session
import structlog
from botocore.config import Config
from botocore.credentials import CredentialResolver, RefreshableCredentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from worker.errors import TransientError
from worker.settings import ArchiveSettings

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
# A PUT is tried this often, waiting 0.5 s, 1 s, 2 s, 4 s (with jitter) between
# tries, before the archiver pauses the partition and tries again later: long
# enough to ride out a blip, short enough to keep polling the consumer group.
PUT_ATTEMPTS = 5
PUT_WAIT_INITIAL_S = 0.5
PUT_WAIT_MAX_S = 8.0
# Temporary credentials last an hour; botocore refreshes them 15 minutes early.
ROLE_DURATION_S = 3600
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
)
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "InvalidClientTokenId",
    }
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ArchiveError(TransientError):
    """An S3 call failed. Archiving pauses and tries again; nothing is dropped.

    ``transient`` is True for failures worth an immediate retry (network,
    throttling, 5xx), False for ones that need an operator (missing bucket,
    refused credentials); both leave the offsets where they were.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class ObjectStore:
    """One bucket, reached with the configured credentials; safe to reuse."""

    def __init__(
        self,
        settings: ArchiveSettings,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        put_attempts: int = PUT_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bucket = settings.bucket
        self._settings = settings
        self._put_attempts = put_attempts
        self._sleep = sleep
        self._client = build_client(
            settings, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        )
        endpoint = urlsplit(settings.endpoint_url)
        if endpoint.scheme == "http" and endpoint.hostname not in LOOPBACK_HOSTS:
            log.warning("archive_endpoint_unencrypted", endpoint=settings.endpoint_url)

    @property
    def where(self) -> str:
        """The bucket and the endpoint, for messages."""
        endpoint = self._settings.endpoint_url or f"AWS {self._settings.region}"
        return f"s3://{self.bucket} ({endpoint})"

    def put(self, key: str, body: bytes) -> None:
        """Store one object, retrying transient failures; raises ArchiveError."""
        retrying = Retrying(
            stop=stop_after_attempt(self._put_attempts),
            wait=wait_exponential(multiplier=PUT_WAIT_INITIAL_S, max=PUT_WAIT_MAX_S)
            + wait_random(0, PUT_WAIT_INITIAL_S),
            retry=retry_if_exception(
                lambda exc: isinstance(exc, ArchiveError) and exc.transient
            ),
            before_sleep=_log_retry,
            sleep=self._sleep,
            reraise=True,
        )
        retrying(self._put_once, key, body)

    def list_keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` (the first 1000 are enough for a check)."""
        try:
            answer = self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, "ListObjectsV2", prefix) from exc
        return [item["Key"] for item in answer.get("Contents", [])]

    def delete(self, key: str) -> None:
        """Remove one object; raises ArchiveError."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, "DeleteObject", key) from exc

    def _put_once(self, key: str, body: bytes) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/gzip"
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, "PutObject", key) from exc

    def _translate(self, exc: Exception, action: str, key: str) -> ArchiveError:
        target = f"s3://{self.bucket}/{key}"
        if isinstance(exc, ClientError):
            return _client_error(exc, action, target, self._settings)
        if isinstance(exc, NoCredentialsError):
            return ArchiveError(
                f"{action} {target}: no AWS credentials found; set "
                "CIO_ARCHIVE__ACCESS_KEY_ID and CIO_ARCHIVE__SECRET_ACCESS_KEY, or "
                "[archive] role_arn, or run with an instance profile",
                transient=False,
            )
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            endpoint = self._settings.endpoint_url or f"AWS S3 {self._settings.region}"
            return ArchiveError(
                f"{action} {target}: cannot reach {endpoint} ({type(exc).__name__}); "
                "check CIO_ARCHIVE__ENDPOINT_URL, CIO_ARCHIVE__REGION and the network",
                transient=True,
            )
        return ArchiveError(
            f"{action} {target}: {type(exc).__name__}: {exc}", transient=True
        )


def build_client(
    settings: ArchiveSettings, *, connect_timeout_s: float, read_timeout_s: float
) -> Any:
    """A boto3 S3 client for ``settings``; makes no network call itself."""
    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # Retries are ours (tenacity, logged); botocore's would hide them.
        retries={"total_max_attempts": 1, "mode": "standard"},
        # Custom endpoints (MinIO, moto) rarely resolve virtual-host names.
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
    )
    return build_session(settings).client(
        "s3", endpoint_url=settings.endpoint_url or None, config=config
    )


def build_session(settings: ArchiveSettings) -> boto3.Session:
    """A boto3 session with the archive's credentials (see the module docstring)."""
    keys: dict[str, str] = {}
    if settings.access_key_id and settings.secret_access_key:
        keys = {
            "aws_access_key_id": settings.access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.secret_access_key.get_secret_value(),
        }
    caller = boto3.Session(region_name=settings.region, **keys)
    if not settings.role_arn:
        return caller
    core = botocore.session.get_session()
    core.register_component(
        "credential_provider", CredentialResolver([AssumedRole(caller, settings)])
    )
    return boto3.Session(botocore_session=core, region_name=settings.region)


class AssumedRole:
    """A botocore credential provider: ``role_arn`` through STS, refreshed."""

    METHOD = "cio-assume-role"
    CANONICAL_NAME = "cio-assume-role"

    def __init__(self, caller: boto3.Session, settings: ArchiveSettings) -> None:
        self._caller = caller
        self._settings = settings

    def load(self) -> Any:
        return RefreshableCredentials.create_from_metadata(
            metadata=self._fetch(), refresh_using=self._fetch, method=self.METHOD
        )

    def _fetch(self) -> dict[str, str]:
        settings = self._settings
        sts = self._caller.client(
            "sts",
            region_name=settings.region,
            endpoint_url=settings.sts_endpoint_url or None,
            config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=30),
        )
        answer = sts.assume_role(
            RoleArn=settings.role_arn,
            RoleSessionName=settings.role_session_name,
            DurationSeconds=ROLE_DURATION_S,
        )
        credentials = answer["Credentials"]
        log.info(
            "archive_role_assumed",
            role_arn=settings.role_arn,
            expires=credentials["Expiration"].isoformat(),
        )
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": credentials["Expiration"].isoformat(),
        }


def _client_error(
    exc: ClientError, action: str, target: str, settings: ArchiveSettings
) -> ArchiveError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    transient = status in TRANSIENT_STATUSES or code in TRANSIENT_CODES
    if getattr(exc, "operation_name", "") == "AssumeRole":
        hint = (
            f"cannot assume {settings.role_arn}: check [archive] role_arn and that "
            "the caller may sts:AssumeRole it"
        )
    elif code == "NoSuchBucket":
        hint = (
            f"bucket {settings.bucket} does not exist there: create it or set "
            "CIO_ARCHIVE__BUCKET (and CIO_ARCHIVE__REGION / CIO_ARCHIVE__ENDPOINT_URL)"
        )
    elif code in CREDENTIAL_CODES:
        hint = (
            "credentials refused: check CIO_ARCHIVE__ACCESS_KEY_ID and "
            "CIO_ARCHIVE__SECRET_ACCESS_KEY (or the role / instance profile)"
        )
    elif code == "AccessDenied" or status == 403:
        hint = (
            "access denied: grant s3:PutObject, s3:ListBucket and s3:DeleteObject "
            f"on {settings.bucket}/{settings.prefix}* to the archiver's credentials"
        )
    elif code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
        hint = "the bucket is in another region: set CIO_ARCHIVE__REGION"
    elif transient:
        hint = "the store is unavailable; archiving resumes when it answers"
    else:
        hint = str(error.get("Message", ""))[:200]
    return ArchiveError(
        f"{action} {target}: {code} ({status}); {hint}", transient=transient
    )


def _log_retry(state: RetryCallState) -> None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    log.warning(
        "s3_put_retry",
        attempt=state.attempt_number,
        wait_s=round(state.upcoming_sleep, 2),
        error=str(error),
    )
