"""No credentials in errors (DESIGN promise 8, issue 13 item 5): one redaction rule
(``pipelines.redact``) behind every message; credentials in an ``s3://`` archive URI are
refused with exit code 2."""

from __future__ import annotations

import io

import pytest
from conftest import write_job

from jobs.cli import main
from jobs.query import run_query
from pipelines import storage, tables, tracking
from pipelines.archive import ArchiveError, DecodeError, check_archive_uri, list_archive
from pipelines.redact import has_userinfo, is_secret_name, redact
from pipelines.storage import StorageUnavailable

SECRETS = ("hunter2", "SSLSECRET", "AKIAEXAMPLE", "wJalrXUtnFEMI", "SESSIONTOKEN", "deadbeef")
PRESIGNED = (
    "https://farm.s3.amazonaws.com/harvest/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600"
    "&X-Amz-Security-Token=SESSIONTOKEN&X-Amz-Signature=deadbeef&X-Amz-SignedHeaders=host"
)


def no_secret(text: str) -> None:
    for s in SECRETS:
        assert s not in text, (s, text)


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://bob:hunter2@db:5432/x", "postgresql://***@db:5432/x"),
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x", "s3://***@bucket/x"),
        ("s3://AKIAEXAMPLE:wJalr/XUtnFEMI@bucket/x", "s3://***@bucket/x"),  # '/' in the secret
        ("postgresql://bob:p@ss#hunter2@db/x", "postgresql://***@db/x"),  # '@', '#' in it
        ("https://alice@mlflow.example.com/api", "https://***@mlflow.example.com/api"),
        (
            "postgresql+psycopg2://bob:hunter2@db/x?sslmode=require&sslpassword=SSLSECRET",
            "postgresql+psycopg2://***@db/x?sslmode=require&sslpassword=***",
        ),
        ("host=db user=bob password=hunter2 dbname=x", "host=db user=bob password=*** dbname=x"),
        ("host=db sslpassword='SSL SECRET' port=5432", "host=db sslpassword=*** port=5432"),
        ("password=hunter2", "password=***"),
        (
            "https://h/x?access_token=SESSIONTOKEN&client_secret=s&api_key=k&key=k&sig=s&page=2",
            "https://h/x?access_token=***&client_secret=***&api_key=***&key=***&sig=***&page=2",
        ),
        ("https://h/x?Signature=deadbeef&AWSAccessKeyId=AKIAEXAMPLE", None),
        ("https://h/x?credential=c&credentials=c", "https://h/x?credential=***&credentials=***"),
        ("Authorization: Bearer SESSIONTOKEN", "Authorization: Bearer ***"),
        # nothing to hide: unchanged
        ("https://host:8080/p?mail=a@b.com&page=2", "https://host:8080/p?mail=a@b.com&page=2"),
        ("file:///data/camera=1/key=3/a.png", "file:///data/camera=1/key=3/a.png"),
        ("s3://bucket/harvest/year=2017", "s3://bucket/harvest/year=2017"),
    ],
)
def test_redact_masks_user_info_passwords_and_secret_parameters(text, expected):
    got = redact(text)
    if expected is not None:
        assert got == expected
    no_secret(got)
    assert redact(got) == got  # idempotent


def test_redact_masks_every_presigned_parameter():
    got = redact(f"GET {PRESIGNED} timed out")
    no_secret(got)
    for name in ("X-Amz-Credential", "X-Amz-Security-Token", "X-Amz-Signature"):
        assert f"{name}=***" in got
    assert "X-Amz-Expires=3600" in got and "X-Amz-SignedHeaders=host" in got


def test_one_rule_everywhere():
    assert tracking.scrub_text is redact  # the name jobs/train.py uses
    assert not hasattr(tables, "redact_uri")
    assert is_secret_name("X-Amz-Security-Token") and is_secret_name("db_password")
    assert not is_secret_name("region")
    assert has_userinfo("s3://K:S@b/x") and not has_userinfo("s3://b/x@y")


# ---------------------------------------------------------------- s3:// user info: exit 2


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x",
        "s3://AKIAEXAMPLE:wJalr/XUtnFEMI@bucket/x",
        "S3://AKIAEXAMPLE@bucket/x",
    ],
)
def test_s3_uri_with_credentials_is_refused(uri):
    with pytest.raises(ArchiveError, match="credentials in an S3 URI are refused") as e:
        check_archive_uri(uri)
    no_secret(str(e.value))
    with pytest.raises(ArchiveError) as e:
        list(list_archive(uri))  # before any S3 client is made
    no_secret(str(e.value))


def test_score_with_credentials_in_the_archive_exits_2_in_one_line(flowscore_home, capsys):
    uri = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x"
    rc = main(["score", "--archive", uri, "--model", "/nonexistent/model", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "credentials in an S3 URI are refused" in err
    assert "s3://***@bucket/x" in err
    no_secret(err)


def test_job_with_credentials_in_the_archive_exits_2(flowscore_home, tmp_path, capsys):
    job = write_job(tmp_path, "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x", "/nonexistent/model")
    rc = main(["run", str(job), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "credentials in an S3 URI are refused" in err
    no_secret(err)


# ---------------------------------------------------------------- the catalog URI


def test_catalog_error_masks_password_sslpassword_and_secret_parameters(
    flowscore_home, monkeypatch
):
    monkeypatch.delenv("FLOWSCORE_WAREHOUSE", raising=False)
    monkeypatch.setenv(
        "FLOWSCORE_CATALOG_URI",
        "nosuchdb://bob:hunter2@db.example/x?sslmode=require&sslpassword=SSLSECRET"
        "&password=hunter2&token=SESSIONTOKEN",
    )
    with pytest.raises(tables.TablesError) as e:
        tables.load_catalog_()
    message = str(e.value)
    assert "nosuchdb://***@db.example/x?sslmode=require&sslpassword=***" in message
    no_secret(message)
    out, err = io.StringIO(), io.StringIO()
    assert run_query("select 1", "table", out=out, err=err) == 2
    assert "nosuchdb://" in err.getvalue()
    no_secret(err.getvalue() + out.getvalue())


# ---------------------------------------------------------------- presigned URLs in outages


def test_outage_message_does_not_echo_a_presigned_url(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://bob:hunter2@s3.example:9000")
    settings = storage.S3Settings(retries=0, retry_budget_s=0)
    with pytest.raises(StorageUnavailable) as e:
        storage.retry_transient(
            lambda: (_ for _ in ()).throw(TimeoutError(f"GET {PRESIGNED} timed out")),
            "read",
            PRESIGNED,
            settings,
            sleep=lambda s: None,
        )
    message = str(e.value)
    assert "S3 storage unavailable" in message and "X-Amz-Signature=***" in message
    assert "http://***@s3.example:9000" in message
    no_secret(message)
    assert storage.storage_failure(e.value) == e.value.message
    no_secret(repr(e.value.__reduce__()))  # what travels from a Ray task

    # the same line found in a Ray task error's text, and a raw transient S3 error
    remote = RuntimeError(
        "ray::MapBatches(decode)() (pid=1)\npipelines.storage.StorageUnavailable: S3 storage "
        f"unavailable: could not read {PRESIGNED} at http://h:9 for 12 s: TimeoutError\n"
    )
    line = storage.storage_failure(remote)
    assert line is not None and "X-Amz-Signature=***" in line
    no_secret(line)
    raw = OSError(f"AWS Error NETWORK_CONNECTION during GetObject of {PRESIGNED}: curlCode: 28")
    line = storage.storage_failure(ConnectionError(str(raw)))
    assert line is not None
    no_secret(line)


def test_cli_prints_an_outage_without_the_presigned_url(monkeypatch, capsys):
    import jobs.cli as cli
    import jobs.commands.query as query_command

    def outage(args):
        raise RuntimeError("chunk failed") from StorageUnavailable(
            f"S3 storage unavailable: could not read {PRESIGNED}"
        )

    monkeypatch.setattr(query_command, "run", outage)
    assert cli.main(["query", "select 1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "X-Amz-Signature=***" in err
    no_secret(err)


def test_error_rows_do_not_keep_a_presigned_url():
    e = DecodeError("read", "OSError", f"403 Forbidden for {PRESIGNED}")
    assert "X-Amz-Signature=***" in e.message
    no_secret(e.message + str(e))
