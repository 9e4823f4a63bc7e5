"""Unit tests of worker.s3: error translation, retries and credentials, with a
fake client in place of the network."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from structlog.testing import capture_logs

from worker.s3 import ArchiveError, AssumedRole, ObjectStore, build_session
from worker.settings import ArchiveSettings

SECRET = "wJalrXUtnFEMI-K7MDENG-SECRET"  # noqa: S105 (a test value)


def archive_settings(**changes: Any) -> ArchiveSettings:
    fields: dict[str, Any] = {
        "bucket": "rejects-bucket",
        "prefix": "cio-rejects",
        "endpoint_url": "http://127.0.0.1:9",
        "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": SECRET,
    }
    fields.update(changes)
    return ArchiveSettings(**fields)


def client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


class FakeClient:
    """Raises the queued errors from put_object, then succeeds."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.puts = 0

    def put_object(self, **_: Any) -> None:
        self.puts += 1
        if self.errors:
            raise self.errors.pop(0)


def store_with(
    errors: list[Exception], sleeps: list[float]
) -> tuple[ObjectStore, FakeClient]:
    store = ObjectStore(archive_settings(), sleep=sleeps.append)
    fake = FakeClient(errors)
    store._client = fake
    return store, fake


def test_put_transient_errors_retried_with_backoff_and_logged() -> None:
    """A 503 and a lost connection are retried, each wait logged as a warning."""
    sleeps: list[float] = []
    errors: list[Exception] = [
        client_error("SlowDown", 503),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    ]
    store, fake = store_with(errors, sleeps)

    with capture_logs() as logs:
        store.put("k", b"body")

    assert fake.puts == 3
    assert len(sleeps) == 2
    assert [e["event"] for e in logs] == ["s3_put_retry", "s3_put_retry"]
    assert all(e["log_level"] == "warning" for e in logs)


def test_put_gives_up_after_the_attempts_with_an_archive_error() -> None:
    """An outage longer than the attempts raises ArchiveError (transient), so
    the archiver pauses the partition instead of dropping anything."""
    sleeps: list[float] = []
    store, fake = store_with([client_error("InternalError", 500)] * 10, sleeps)

    with pytest.raises(ArchiveError) as caught:
        store.put("k", b"body")

    assert caught.value.transient
    assert fake.puts == 5


@pytest.mark.parametrize(
    ("code", "status", "operation", "hint"),
    [
        ("NoSuchBucket", 404, "PutObject", "CIO_ARCHIVE__BUCKET"),
        ("InvalidAccessKeyId", 403, "PutObject", "CIO_ARCHIVE__ACCESS_KEY_ID"),
        ("SignatureDoesNotMatch", 403, "PutObject", "CIO_ARCHIVE__SECRET_ACCESS_KEY"),
        ("AccessDenied", 403, "PutObject", "s3:PutObject"),
        ("PermanentRedirect", 301, "PutObject", "CIO_ARCHIVE__REGION"),
        ("AccessDenied", 403, "AssumeRole", "role_arn"),
    ],
)
def test_put_permanent_errors_not_retried_and_say_what_to_fix(
    code: str, status: int, operation: str, hint: str
) -> None:
    """Errors an operator must fix fail at once with the setting to change, and
    never contain the secret key."""
    sleeps: list[float] = []
    store, fake = store_with([client_error(code, status, operation)], sleeps)

    with pytest.raises(ArchiveError) as caught:
        store.put("cio-rejects/x.jsonl.gz", b"body")

    message = str(caught.value)
    assert not caught.value.transient
    assert fake.puts == 1
    assert sleeps == []
    assert hint in message
    assert "s3://rejects-bucket/cio-rejects/x.jsonl.gz" in message
    assert SECRET not in message


def test_settings_never_show_the_secret_key() -> None:
    """The secret access key is masked in repr and in the dumped settings."""
    settings = archive_settings()

    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump(mode="json"))


def test_settings_half_a_key_pair_is_refused() -> None:
    """An access key id without its secret (or the reverse) is a config error."""
    with pytest.raises(ValueError, match="CIO_ARCHIVE__SECRET_ACCESS_KEY"):
        ArchiveSettings(bucket="b", access_key_id="AKID")


def test_build_session_with_keys_uses_them() -> None:
    """Configured keys are the session's credentials (no network needed)."""
    session = build_session(archive_settings())

    credentials = session.get_credentials()

    assert credentials.access_key == "AKIDEXAMPLE"
    assert credentials.secret_key == SECRET


def test_assumed_role_credentials_refresh_from_sts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With role_arn the session's credentials come from STS AssumeRole with the
    configured session name, and botocore may refresh them."""
    import datetime

    calls: list[dict[str, Any]] = []

    class FakeSts:
        def assume_role(self, **kwargs: Any) -> dict[str, Any]:
            calls.append(kwargs)
            return {
                "Credentials": {
                    "AccessKeyId": "ASIATEMP",
                    "SecretAccessKey": "temp-secret",
                    "SessionToken": "token",
                    "Expiration": datetime.datetime.now(datetime.UTC)
                    + datetime.timedelta(hours=1),
                }
            }

    settings = archive_settings(role_arn="arn:aws:iam::123456789012:role/archiver")
    provider = AssumedRole(
        build_session(settings.model_copy(update={"role_arn": ""})), settings
    )
    monkeypatch.setattr(provider._caller, "client", lambda *a, **k: FakeSts())

    credentials = provider.load()

    assert credentials.access_key == "ASIATEMP"
    assert credentials.refresh_needed() is False
    assert calls == [
        {
            "RoleArn": "arn:aws:iam::123456789012:role/archiver",
            "RoleSessionName": "cio-worker-archiver",
            "DurationSeconds": 3600,
        }
    ]
