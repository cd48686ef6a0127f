"""S3: the endpoint, region and credentials the standard AWS environment and config files
name (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` or the profile's `endpoint_url` for
S3-compatible stores such as MinIO), handed alike to pyarrow's filesystem and boto3's
client, and the one line that explains each failure a user can fix (network, bucket,
credentials, TLS). storage.py reads and writes through them; callers name them s3.X.
"""
from __future__ import annotations

import contextlib
import copyreg
import os
import re
import threading
from functools import lru_cache

import pyarrow.fs as pafs

from deepfake_ray.errors import UsageError

CONNECTIONS = 32  # a boto3 client's pool: storage.write_many's files at once


# what s3_endpoint's answer depends on, beside the config files' content (read once a process)
ENDPOINT_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "HOME",
                     "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


def s3_endpoint() -> str | None:
    """The S3 endpoint boto3 would use, by botocore's own rules: AWS_ENDPOINT_URL_S3 >
    AWS_ENDPOINT_URL > the profile's services section (`s3 = endpoint_url = ...`) > its
    `endpoint_url`; then the AWS CLI's `s3 = endpoint_url = ...` in the profile itself.
    pyarrow's AWS SDK reads none of them from ~/.aws/config, so both libraries are handed
    this one."""
    endpoint = configured_endpoint(tuple(os.environ.get(name) for name in ENDPOINT_SETTINGS))
    if endpoint and "://" not in endpoint:  # pyarrow would try TLS, boto3 refuse it: neither says why
        shown = without_password(endpoint)
        host = re.sub(r"^https?:/*", "", shown, flags=re.IGNORECASE)  # `http:/host`: a slash short
        raise UsageError(f"the S3 endpoint '{shown}' (AWS_ENDPOINT_URL or {aws_config_file()}) has no "
                         f"scheme: write http://{host}, or https://{host} for a store that speaks TLS")
    return endpoint


def without_password(endpoint: str) -> str:
    """The endpoint as errors show it: a user and password in it (http://USER:PASS@host,
    which some proxies take) are a credential, never printed."""
    return re.sub(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:/+)?)[^/]*@", r"\1***@", endpoint)  # http:/ too


USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@\"]*@")


def redacted(text: str) -> str:
    """`text` with any URL's user and password in it as ***: botocore's errors quote the
    endpoint whole ("Could not connect to the endpoint URL: http://USER:PASS@host/...")."""
    return USERINFO.sub(r"\1***@", text)


@lru_cache(maxsize=8)
def configured_endpoint(settings: tuple) -> str | None:
    """Cached by the settings: reading the config files takes ~7 ms, and every S3 write asks.
    ConfiguredEndpointProvider is botocore's own chain (pinned through boto3's version)."""
    import botocore.exceptions
    import botocore.session
    from botocore.configprovider import ConfiguredEndpointProvider

    session = botocore.session.Session()
    try:
        profile = session.get_scoped_config()
        if session.get_config_variable("ignore_configured_endpoint_urls"):
            return None
        endpoint = ConfiguredEndpointProvider(session.full_config, profile, "s3").provide()
    except botocore.exceptions.ProfileNotFound as e:  # pyarrow would try AWS itself, then say "cannot reach"
        raise UsageError(f"{e}: check AWS_PROFILE and {aws_config_file()}") from None
    except botocore.exceptions.InvalidConfigError as e:
        raise UsageError(f"{aws_config_file()}: {e}") from None
    s3 = profile.get("s3")
    return endpoint or (s3.get("endpoint_url") if isinstance(s3, dict) else None)


def aws_config_file() -> str:
    return os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for the endpoint, region and CA the environment names now:
    a notebook that fixes AWS_ENDPOINT_URL after a failed command reads through the new
    one (the first one made stayed for the process)."""
    return filesystem_for(s3_endpoint(), os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                          os.environ.get("AWS_CA_BUNDLE"))


@lru_cache(maxsize=8)
def filesystem_for(endpoint: str | None, region: str | None, ca: str | None) -> pafs.S3FileSystem:
    kwargs = {"endpoint_override": endpoint} if endpoint else {}
    if region:
        kwargs["region"] = region
    if ca:  # a store with a private CA: boto3 reads AWS_CA_BUNDLE, pyarrow not
        kwargs["tls_ca_file_path"] = ca
    # delayed open, for what Ray Train and Tune write through it (our own writes go
    # through boto3, see s3_put): a file under 5 MB is sent as one PutObject when closed,
    # not as a multipart upload opened at once (three round trips: 31 against 15 ms a
    # file on moto)
    return pafs.S3FileSystem(allow_delayed_open=True, retry_strategy=retries(), **kwargs)


def retries() -> pafs.S3RetryStrategy:
    """6 tries, backing off 25 ms doubling (1.6 s in all). pyarrow's default, 3 tries from a
    budget the filesystem shares, stopped retrying at all once many requests had failed
    (throttled: S3 splitting a busy prefix). Longer waits are the Ray Data task's to retry
    (runtime.configure_data); an endpoint nothing answers fails within seconds."""
    return pafs.AwsDefaultS3RetryStrategy(6)


def with_retries(kwargs: dict) -> pafs.S3FileSystem:
    """An S3 filesystem unpickled (in a Ray Data task, a Train worker) with our retries:
    pyarrow 26's own pickling leaves them out (apache/arrow GH-47348)."""
    return pafs.S3FileSystem._reconstruct({**kwargs, "retry_strategy": retries()})


def pickled_with_retries(fs: pafs.S3FileSystem):
    _, (kwargs,) = fs.__reduce__()
    return with_retries, (kwargs,)


copyreg.pickle(pafs.S3FileSystem, pickled_with_retries)  # pickle's and cloudpickle's (Ray's)


# The AWS SDK's error names, as pyarrow's messages carry them -> what the user should check.
S3_PROBLEMS = {
    "NETWORK_CONNECTION": "cannot reach the S3 endpoint{endpoint}: check AWS_ENDPOINT_URL and the network",
    "NO_SUCH_BUCKET": "the bucket does not exist: check the s3:// path",
    "ACCESS_DENIED": "access denied: check the AWS credentials (AWS_ACCESS_KEY_ID and "
                     "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials) and the bucket's policy",
    "INVALID_ACCESS_KEY_ID": "the access key is not known to this store: check AWS_ACCESS_KEY_ID or AWS_PROFILE",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    "NO_CREDENTIALS": "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                      "AWS_PROFILE, or ~/.aws/credentials",
    "TLS": "the S3 endpoint{endpoint}'s TLS certificate was refused: for a store whose certificate a "
           "private CA signed, set AWS_CA_BUNDLE to that CA's file",
    "PLAIN_HTTP": "the S3 endpoint{endpoint} answered in plain HTTP, not TLS: write its address with "
                  "http://, not https:// (AWS_ENDPOINT_URL)",
    "INVALID_OBJECT_STATE": "the object is archived (a Glacier storage class): restore it, or copy it "
                            "to a standard class, to read it",
    # a session's credentials (SSO, an assumed role) last hours: a long training outlives them
    "EXPIRED_TOKEN": "the AWS credentials have expired (a session token's): renew them (aws sso login, "
                     "or a new session), then run the same command again: it resumes",
    # pyarrow (which Ray Data and Ray Train read and write through) talks to one region:
    # AWS answers a bucket in another with a redirect, which pyarrow names with its region
    "WRONG_REGION": "the bucket is in region {bucket_region}, not {configured}: set AWS_REGION={bucket_region} "
                    "(every bucket a run reads or writes must be in that region: copy a source in "
                    "another first)",
    # MinIO's and Ceph's bucket quotas (AWS has none)
    "QUOTA_EXCEEDED": "the bucket's quota is full: free space there or raise its quota, then run the "
                      "same command again: it resumes",
}


# The same problems as botocore names them (boto3 writes, reads and locks).
BOTO_PROBLEMS = {"NoSuchBucket": "NO_SUCH_BUCKET", "AccessDenied": "ACCESS_DENIED", "403": "ACCESS_DENIED",
                 "InvalidAccessKeyId": "INVALID_ACCESS_KEY_ID",
                 "SignatureDoesNotMatch": "SIGNATURE_DOES_NOT_MATCH",
                 "InvalidObjectState": "INVALID_OBJECT_STATE", "ExpiredToken": "EXPIRED_TOKEN",
                 "RequestExpired": "EXPIRED_TOKEN", "TokenRefreshRequired": "EXPIRED_TOKEN",
                 "QuotaExceeded": "QUOTA_EXCEEDED", "XMinioAdminBucketQuotaExceeded": "QUOTA_EXCEEDED"}


# S3 failures that pass: throttling, its 500s and 503s, a connection reset mid-body; as
# boto3's errors and pyarrow's (the AWS SDK's names) word them. A Ray Data task that ends
# on one is run again (runtime.configure_data), once the clients' own retries are spent.
# Ray tries each as a substring, then as a regex: anchored to the clients' own wording, so
# that a file named IMG_1500.jpg in a message is no "(500)".
TRANSIENT_ERRORS = (
    r"An error occurred \((?:SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttling|50[03])\) "
    r"when calling",
    r"AWS Error (?:SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT|THROTTLING)\b",
    r"curlCode: 18\b", "Connection was closed before we received a valid response",
    "Read timeout on endpoint URL", "Connection broken: IncompleteRead")


# What S3 answers a read of one object it keeps from us while it lists the others: archived,
# uploaded by another account, encrypted with a key we may not use (all 403s)
OBJECT_REFUSALS = ("AccessDenied", "403", "InvalidObjectState")


class StoreError(OSError):
    """A boto3 request on `uri` failed: the store's problem (network, bucket, credentials),
    not the file's. `problem`: its S3_PROBLEMS key, when the user can fix it."""

    def __init__(self, uri: str, message: str, problem: str | None = None):
        super().__init__(message)
        self.uri, self.problem = uri, problem

    def __reduce__(self):  # raised in a Ray task, it is pickled to the driver
        return StoreError, (self.uri, str(self), self.problem)


class ObjectRefused(StoreError):
    """S3 refused to read this one object (OBJECT_REFUSALS). Where many files are read
    (ingest, scoring) it is that file's row; elsewhere it is explained like any StoreError.
    Credentials that may read nothing make every file such a row, which those stages
    refuse as a whole."""

    def __reduce__(self):
        return ObjectRefused, (self.uri, str(self), self.problem)


def store_error(uri: str, cause: BaseException) -> StoreError:
    return StoreError(uri, redacted(f"{uri}: {cause}"), boto_problem(cause))


@contextlib.contextmanager
def store_errors(uri: str):
    """boto3's and botocore's failures within, as the StoreError of `uri` (said as pyarrow's are)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as e:
        # not chained: botocore's own text quotes the endpoint, password and all, and Ray
        # writes a task's whole chain to its logs (store_error read what it needs of it)
        raise store_error(uri, e) from None


def boto_problem(e: BaseException) -> str | None:
    """The S3_PROBLEMS key of a botocore or boto3 failure, if the user can fix it."""
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, NoCredentialsError,
                                     PartialCredentialsError)

    # no connection, a timeout or a reset (ConnectionError, HTTPClientError), no credentials
    known = (ClientError, ConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError)
    while e is not None and not isinstance(e, known):
        e = e.__cause__ or e.__context__  # boto3's S3UploadFailedError wraps the ClientError
    if isinstance(e, ClientError):
        return BOTO_PROBLEMS.get(e.response.get("Error", {}).get("Code"))
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return "NO_CREDENTIALS"
    return "NETWORK_CONNECTION" if e is not None else None


def explain(e: BaseException) -> str | None:
    """One line for an S3 failure the user can fix (network, bucket, credentials), else None."""
    if isinstance(e, StoreError):
        return f"{e.uri}: " + S3_PROBLEMS[tls_or(e.problem, str(e))].format(endpoint=endpoint_text()) \
            if e.problem else None
    text = str(e)
    if (code := pyarrow_problem(e)) is None:
        return None
    where = re.search(r"bucket '([^']*)'", text)
    key = re.search(r"key '([^']*)'", text)
    uri = f"s3://{where.group(1)}/{key.group(1) if key else ''}".rstrip("/") if where else "S3"
    return f"{uri}: " + S3_PROBLEMS[tls_or(code, text)].format(endpoint=endpoint_text(), **regions_in(text))


# pyarrow's words, after the AWS SDK's, for a request S3 redirected to the bucket's region
REGION_REDIRECT = re.compile(r"Looks like the configured region is '([^']*)' while the bucket is located in '([^']*)'")


def regions_in(text: str) -> dict:
    """WRONG_REGION's {configured} and {bucket_region}, from pyarrow's message."""
    if not (found := REGION_REDIRECT.search(text)):
        return {}
    return {"configured": f"the configured {found[1]}" if found[1] else "the default (none is configured)",
            "bucket_region": found[2]}


def pyarrow_problem(e: BaseException) -> str | None:
    """The S3_PROBLEMS key of a pyarrow S3 failure, from the AWS SDK's error name in it."""
    text = str(e)
    if not isinstance(e, OSError) or "AWS Error" not in text:
        return None
    code = next((c for c in S3_PROBLEMS if f"AWS Error {c}" in text), None)
    if code is None and REGION_REDIRECT.search(text):
        code = "WRONG_REGION"
    if code is None and (named := re.search(r"ExceptionName: (\w+)", text)):  # "AWS Error UNKNOWN (...)"
        code = BOTO_PROBLEMS.get(named.group(1))  # an expired session token's, an archived object's
    return "ACCESS_DENIED" if code is None and "response code: 403" in text else code


def tls_or(problem: str, text: str) -> str:
    """A connection that failed on TLS is no unreachable network: the endpoint's certificate
    was refused, or (OpenSSL's "wrong version number") its answer was not TLS at all."""
    if problem != "NETWORK_CONNECTION":
        return problem
    if re.search(r"wrong.version.number", text, re.IGNORECASE):
        return "PLAIN_HTTP"
    return "TLS" if re.search(r"SSL|certificate|curlCode: (35|51|58|60)\b", text) else problem


def endpoint_text() -> str:
    endpoint = s3_endpoint()
    return f" {without_password(endpoint)}" if endpoint else ""


def s3_client(uri: str, quick: bool = False):
    """(boto3 S3 client at the configured endpoint, bucket, key) for an s3:// URI: every
    write, delete, move and ETag listing of ours, and the lease's conditional writes. `quick`:
    short timeouts and few retries, for a lease's renewals (botocore's defaults let one
    stalled request outlast the lease)."""
    bucket, _, key = str(uri).rstrip("/").removeprefix("s3://").partition("/")
    return boto3_client(s3_endpoint(), quick), bucket, key


_client_lock = threading.Lock()


@lru_cache(maxsize=8)
def boto3_client(endpoint: str | None, quick: bool = False):
    """One client per endpoint and process: making one costs ~12 ms of CPU, and boto3's
    default session is not safe to make clients from in many threads at once. As many
    connections as write_many's threads: 10 by default, so 22 of them waited."""
    import boto3
    from botocore.config import Config

    # S3-compatible stores: checksums only where S3 requires them. botocore's default sends
    # every PUT as aws-chunked with a trailing checksum, which some such stores refuse.
    checksums = dict(request_checksum_calculation="when_required",
                     response_checksum_validation="when_required") if endpoint else {}
    timeouts = dict(connect_timeout=10, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"}) if quick else {}
    with _client_lock:  # the region as s3_filesystem takes it (botocore reads no AWS_REGION)
        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint, config=Config(max_pool_connections=CONNECTIONS, **checksums, **timeouts),
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
