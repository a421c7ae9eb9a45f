"""URLs of remote stores: which schemes savegame reaches, how credentials are found, how a URL
is shown (never with a secret in it), and how the object-store library's errors become typed
savegame errors.

The object-store library is obstore (Rust ``object_store``; shared/REMOTE.md, docs/remote.md):
one API for S3, GCS, Azure, HTTP, local and memory, with create-only conditional puts, ranged
and ETag-pinned reads, and writers that abort on an exception. Credentials come from where each
store's own tools look (the ``AWS_*``, ``GOOGLE_*``, ``AZURE_*`` environment variables, instance
metadata); savegame never stores or prints them.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes, urlsplit, urlunsplit

from savegame import errors
from savegame.storage.base import ChangedError, RangeNotSupportedError

__all__ = [
    "SCHEMES",
    "Target",
    "connect",
    "is_url",
    "redact",
    "redact_text",
    "translate",
]

#: Every scheme a run or checkpoint URL may have, and what it reaches.
SCHEMES: dict[str, str] = {
    "s3": "Amazon S3 and S3-compatible servers (MinIO, Ceph, R2…): s3://bucket/prefix",
    "gs": "Google Cloud Storage: gs://bucket/prefix",
    "az": "Azure Blob Storage: az://container/prefix (also azure://, abfs://, abfss://)",
    "azure": "Azure Blob Storage",
    "abfs": "Azure Data Lake / Blob Storage",
    "abfss": "Azure Data Lake / Blob Storage (TLS)",
    "http": "a plain web server, read-only (pull, restore, ls, verify)",
    "https": "a plain web server, read-only (pull, restore, ls, verify)",
    "file": "a local folder: file:///abs/path",
    "memory": "a store in this process's memory, for tests: memory://name",
}
_READ_ONLY = {"http", "https"}
_AZURE = {"az", "azure", "abfs", "abfss"}

# Query parameters are where signed URLs and SAS tokens carry their secrets; every value is
# hidden (a parameter name is not secret, and showing which ones were given helps debugging).
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")

#: What each store reads its credentials from, for the "missing credentials" message.
_CREDENTIALS_HELP = {
    "s3": (
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
        "credentials; AWS_ENDPOINT_URL and AWS_ALLOW_HTTP=true for an S3-compatible server on "
        "http://), run on a machine with an instance role, or set AWS_SKIP_SIGNATURE=true for a "
        "public bucket"
    ),
    "gs": (
        "set GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT) to a service-account key "
        "file, or run on a machine with a service account"
    ),
    "az": (
        "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY, "
        "or AZURE_CLIENT_ID / AZURE_CLIENT_SECRET / AZURE_TENANT_ID)"
    ),
    "http": "put the user and password in the URL (https://user:password@host/…) if the server asks",
}


def is_url(where: object) -> bool:
    """True for a string of the form ``scheme://…`` or ``file:/…`` (a path never is)."""
    return isinstance(where, str) and (
        bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", where)) or is_file_url(where)
    )


def is_file_url(where: object) -> bool:
    """True for a ``file:`` URL: ``file:///abs/path``, ``file://localhost/…``, and RFC 8089's
    one-slash ``file:/abs/path`` (what Java's ``File.toURI()`` prints), which would otherwise
    be taken as the relative folder ``./file:/abs/path``."""
    return isinstance(where, str) and where[:6].lower() == "file:/"


def redact(url: str) -> str:
    """``url`` without secrets: a ``user:password@`` becomes ``***@`` and every query value
    and fragment value ``***``. Safe on any string (a non-URL is returned as is)."""
    if not is_url(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    netloc, path = parts.netloc, parts.path
    odd = "@" not in netloc and not _port_ok(netloc)
    if "@" not in netloc and not odd and not parts.query and not parts.fragment:
        return url  # nothing secret (and urlunsplit would rewrite s3:///x as s3:/x)
    if odd:
        # ``s3://KEY:wJalr/xyz@bucket/…``: a password holding ``/`` (AWS secret keys often
        # do), not percent-encoded, ends the authority early, so urlsplit's "host" is
        # ``KEY:wJalr`` and the rest of the secret is in the path. Everything up to the
        # path's last ``@`` is hidden; with no ``@``, all of it (nothing is a safe guess).
        if "@" in path:
            host, slash, rest = path.rsplit("@", 1)[1].partition("/")
            netloc, path = "***@" + host, slash + rest
        else:
            netloc, path = "***", ""
    elif "@" in netloc and not _azure_container(parts.scheme, netloc):
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit(
        (parts.scheme, netloc, path, _hide_values(parts.query), _hide_values(parts.fragment))
    )


def _azure_container(scheme: str, netloc: str) -> bool:
    """``container@account.dfs.core.windows.net`` (ADLS Gen2's own URL form,
    ``abfss://container@account…/path``): a container name, not a user; nothing secret."""
    user, _, host = netloc.rpartition("@")
    return (
        scheme.lower() in _AZURE
        and ":" not in user
        and bool(re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?", user))
        and bool(re.fullmatch(r"[a-z0-9]+\.(?:dfs|blob)\.core\.windows\.net", host.lower()))
    )


def _port_ok(netloc: str) -> bool:
    """Whether ``netloc`` (no ``@``) is ``host`` or ``host:port`` with a numeric port."""
    host = netloc.rsplit("]", 1)[-1]  # an IPv6 literal's colons are not a port
    if ":" not in host:
        return True
    return host.rsplit(":", 1)[1].isdigit() or host.endswith(":")


def _hide_values(query: str) -> str:
    """A query string (or fragment) with every value ``***`` (names kept: they help)."""
    if not query:
        return query
    # a piece without "=" may itself be the token (``?SECRET``): hidden whole
    return "&".join(
        piece.partition("=")[0] + "=***" if "=" in piece else "***" for piece in query.split("&")
    )


#: Environment variables whose values are secrets: never shown, wherever a message from a
#: library or a server quotes one (an S3 ExpiredToken answer echoes the session token).
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_MASTER_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN", "AZURE_CLIENT_SECRET", "GOOGLE_SERVICE_ACCOUNT_KEY",
)  # fmt: skip


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (an error message from a library) redacted, and every value
    of a secret environment variable (:data:`_SECRET_ENV`) replaced by ``***``."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4 and value in text:
            text = text.replace(value, "***")
    return text


@dataclass(frozen=True)
class Target:
    """A remote store reached through a URL."""

    scheme: str
    #: The obstore store, already scoped to the URL's bucket and prefix.
    store: Any
    #: The URL with secrets removed: what messages and logs show.
    url: str
    #: http(s): nothing may be written.
    read_only: bool
    #: A key prefix the caller adds to every key (obstore scopes most stores to the URL's path
    #: itself; its in-memory store cannot be scoped, so ``memory://name/a/b`` gives ``"a/b"``).
    prefix: str = ""


# The object-store clients built in this process (see connect): at most _CLIENTS_KEPT, the
# oldest dropped first. _ENV_PREFIXES: the environment the stores read their settings from.
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_CLIENTS_KEPT = 16
# (AZURITE_: obstore's Azure emulator reads its URL from AZURITE_BLOB_STORAGE_URL.)
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "AZURITE_", "OBJECT_STORE_")

# One obstore MemoryStore per memory:// name in this process: the same URL twice is the same
# store, as a bucket is.
_MEMORY: dict[str, Any] = {}
_MEMORY_LOCK = threading.Lock()


def _obstore() -> Any:
    try:
        import obstore
    except ImportError as exc:  # the `remote` extra
        raise errors.MissingDependencyError(
            "remote storage needs obstore: pip install 'savegame[remote]'"
        ) from exc
    return obstore


def _unsupported(url: str, scheme: str) -> errors.UnsupportedURLError:
    listed = ", ".join(f"{s}://" for s in SCHEMES)
    return errors.UnsupportedURLError(
        f"{redact(url)}: unknown URL scheme {scheme + '://'!r}; savegame reaches {listed} "
        "(or give a local folder path)",
        path=redact(url),
    )


def file_path(url: str) -> str:
    """The local path a ``file://`` URL names: ``file:///abs/path`` (or ``file://localhost/…``),
    percent-decoded.

    Raises:
        UnsupportedURLError: the URL names another host, as ``file://exp1`` does (``exp1`` is
            read as a host name, not as a relative folder: it would otherwise mean the
            current folder, and ``prune`` would act there).
    """
    parts = urlsplit(url)
    host = parts.netloc
    if host not in ("", "localhost") or not parts.path:
        raise errors.UnsupportedURLError(
            f"{url}: a file:// URL names an absolute local path, file:///abs/path (three "
            f"slashes); here {host!r} would be a host name. Give the path without file:// for "
            "a relative one",
            path=url,
        )
    # the bytes the URL encodes, as the file system's names: %FF stays that byte, and %E6%8E%A8
    # is 推 under UTF-8 but still the same three bytes under LC_ALL=C
    return os.fsdecode(unquote_to_bytes(os.fsencode(parts.path)))


def connect(url: str, *, options: dict[str, Any] | None = None) -> Target:
    """The obstore store that ``url`` names, scoped to its bucket and prefix.

    ``options`` are extra store settings (obstore's config keys, e.g. ``{"region": "eu-west-1"}``);
    everything else comes from the environment, as each store's own tools read it.

    Raises:
        UnsupportedURLError: the scheme is not one of :data:`SCHEMES`, or the URL has no bucket.
        MissingDependencyError: obstore is not installed.
        CredentialsError: credentials in the URL that the store cannot use.
    """
    if not is_url(url):
        raise errors.UnsupportedURLError(f"{url!r} is not a URL", path=url)
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES and not is_file_url(url):
        raise _unsupported(url, scheme)
    if is_file_url(url):
        raise errors.UnsupportedURLError(
            "file:// URLs are local folders (savegame.storage.as_store handles them)", path=url
        )
    parts = urlsplit(url)
    shown = redact(url)
    try:
        port = parts.port
    except ValueError:
        raise errors.UnsupportedURLError(
            f"{shown}: what follows {scheme}:// is not a {'host' if scheme in _READ_ONLY else 'bucket'}"
            "[:port]; if the URL carries user:password, percent-encode every '/', '?', '#' "
            "and '@' in them (%2F, %3F, %23, %40), or set the credentials in the environment",
            path=shown,
        ) from None
    # The bucket as typed: urlsplit's ``hostname`` lower-cases it, and S3 bucket names are
    # case-sensitive (a legacy bucket may hold capitals): s3://BKT must not reach bucket bkt.
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        host = host.partition("]")[0] + "]"
    elif port is not None or host.endswith(":"):
        host = host.rpartition(":")[0]
    if not host:
        raise errors.UnsupportedURLError(
            f"{shown}: no {'host' if scheme in _READ_ONLY else 'bucket'} in the URL "
            f"(expected {scheme}://{'host' if scheme in _READ_ONLY else 'bucket'}/path)",
            path=shown,
        )
    segments = unquote(parts.path).removeprefix("/").removesuffix("/").split("/")
    if scheme not in _READ_ONLY and "" in segments and segments != [""]:
        raise errors.UnsupportedURLError(
            f"{shown}: an empty path segment ('//') names no object-store key (the store "
            "refuses it); give the path with single slashes",
            path=shown,
        )
    if any(part in (".", "..") for part in segments):
        raise errors.UnsupportedURLError(
            f"{shown}: '.' and '..' are not allowed in a store URL's path (the store would "
            "resolve them, and write somewhere other than the URL you see); give the path "
            "without them",
            path=shown,
        )
    _obstore()
    from obstore.store import HTTPStore, MemoryStore, from_url

    kwargs: dict[str, Any] = dict(options or {})
    if scheme == "memory":
        with _MEMORY_LOCK:
            store = _MEMORY.setdefault(host, MemoryStore())
        return Target(scheme, store, shown, read_only=False, prefix=parts.path.strip("/"))
    client: dict[str, Any] = {
        "connect_timeout": timedelta(seconds=10),
        "timeout": timedelta(seconds=300),
    }
    retry = {
        "max_retries": 6,
        "retry_timeout": timedelta(seconds=120),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
            "base": 2,
        },
    }
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if _azure_container(scheme, parts.netloc):
        user = password = None  # abfss://container@account.dfs.core.windows.net/: obstore's
        host = parts.netloc  # own form, not credentials
    clean = urlunsplit((parts.scheme, host + (f":{port}" if port else ""), parts.path,
                        parts.query, ""))  # fmt: skip
    if scheme in _READ_ONLY:
        if parts.query:
            # obstore's HTTP store joins object paths onto the URL's path and drops its query, so
            # a token there would silently not be sent with the requests that need it.
            raise errors.UnsupportedURLError(
                f"{shown}: a query string (a token or a signature) in an http(s) run URL is not "
                "supported: it would not be sent with each file's request; serve the run without "
                "one, or use https://user:password@host/… (basic auth)",
                path=shown,
            )
        if user is not None:
            import base64

            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            client["default_headers"] = {"authorization": f"Basic {token}"}
        if scheme == "http":
            client["allow_http"] = True
        store = HTTPStore.from_url(clean, client_options=client, retry_config=retry)
        return Target(scheme, store, shown, read_only=True)
    if user is not None:
        if scheme != "s3" or password is None:
            raise errors.CredentialsError(
                f"{shown}: credentials in a {scheme}:// URL are not understood; "
                + _CREDENTIALS_HELP["az" if scheme in _AZURE else scheme],
                path=shown,
            )
        kwargs.setdefault("access_key_id", user)
        kwargs.setdefault("secret_access_key", password)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if scheme == "s3" and endpoint and endpoint.startswith("http://"):
        client["allow_http"] = True
    # obstore honours GOOGLE_ALLOW_HTTP / AZURE_ALLOW_HTTP only when no client options are
    # given, and ours (timeouts) replace them: pass the user's setting on, as for S3 above (an
    # emulator or gateway on plain http; docs/remote.md). Azurite via
    # AZURE_STORAGE_USE_EMULATOR needs none of this: obstore allows http for it itself.
    allow = os.environ.get("AZURE_ALLOW_HTTP" if scheme in _AZURE else "GOOGLE_ALLOW_HTTP", "")
    if scheme in _AZURE | {"gs"} and allow.strip().lower() in ("1", "true", "yes", "on"):
        client["allow_http"] = True
    # One client per URL and configuration in this process: building one costs milliseconds
    # (each Checkpointer, load and CLI call would pay it) and a reused one keeps its warm
    # connections. The key holds everything the client is built from, the environment
    # included (obstore reads credentials and endpoints from it), so a changed setting gets
    # a new client; it lives only in memory and only the URL's redacted form is ever shown.
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    key = (clean, user, password, repr(sorted(kwargs.items())), env)
    with _CLIENTS_LOCK:
        store = _CLIENTS.get(key)
    if store is None:
        try:
            store = from_url(clean, client_options=client, retry_config=retry, **kwargs)
        except Exception as exc:  # obstore raises ValueError / its own errors for bad config
            raise translate(exc, shown) from None
        with _CLIENTS_LOCK:
            _CLIENTS[key] = store
            while len(_CLIENTS) > _CLIENTS_KEPT:
                _CLIENTS.pop(next(iter(_CLIENTS)))
    return Target(scheme, store, shown, read_only=False)


def _scheme_of(where: str) -> str:
    scheme = where.split("://", 1)[0].lower() if is_url(where) else ""
    return "az" if scheme in _AZURE else "http" if scheme in _READ_ONLY else scheme


def translate(exc: BaseException, where: str) -> OSError:
    """The typed error for an obstore failure on ``where`` (a redacted URL), its message
    redacted and without the library's debug dump. Callers ``raise translate(e, url) from None``
    (the original's text may hold a signed URL)."""
    if isinstance(exc, errors.CheckpointError) and isinstance(exc, OSError):
        return exc
    where = redact(where)
    raw = str(exc).split("\n\nDebug source:", 1)[0]
    text = redact_text(raw).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    name = type(exc).__name__
    low = raw.lower()
    scheme = _scheme_of(where)
    help_ = _CREDENTIALS_HELP.get(scheme, "")
    if "nosuchbucket" in low or "bucket does not exist" in low or "containernotfound" in low:
        bucket = urlsplit(where).hostname or "?"
        return errors.CheckpointNotFoundError(
            f"{where}: bucket {bucket!r} does not exist (create it first, or check the URL)",
            path=where,
        )
    if isinstance(exc, FileNotFoundError) or name == "NotFoundError":
        return FileNotFoundError(errno.ENOENT, f"not found: {first}", where)
    if name == "AlreadyExistsError" or isinstance(exc, FileExistsError):
        return FileExistsError(errno.EEXIST, f"already exists: {first}", where)
    if name in ("PreconditionError", "NotModifiedError"):
        return ChangedError(errno.ESTALE, f"{where} changed while it was being read ({first})")
    if (
        name == "UnauthenticatedError"
        or "169.254.169.254" in low
        or "fd00:ec2::254" in low
        or "metadata.google.internal" in low
        or "invalidaccesskeyid" in low
        or "signaturedoesnotmatch" in low
        or "expiredtoken" in low
        or "credential" in low
        or "401 unauthorized" in low
        or "account must be specified" in low  # Azure, no AZURE_STORAGE_ACCOUNT_NAME
    ):
        return errors.CredentialsError(
            f"{where}: no valid credentials ({first}); {help_}".rstrip("; "), path=where
        )
    if (
        scheme == "s3"
        and "400 bad request" in low
        and "<code>" not in low  # no reason given (a body naming one is another error)
        and (os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_SECURITY_TOKEN"))
    ):
        # S3 answers a HEAD signed with an expired or invalid session token with a bare 400
        # (a HEAD has no body to say ExpiredToken in); with a session token set, that is
        # almost always the cause.
        return errors.CredentialsError(
            f"{where}: no valid credentials ({first}): S3 answers this way to an expired or "
            f"invalid AWS_SESSION_TOKEN; renew the temporary credentials ({help_})",
            path=where,
        )
    if name == "PermissionDeniedError" or "403 forbidden" in low or "accessdenied" in low:
        return errors.AccessDeniedError(
            f"{where}: access denied ({first}); the credentials in use lack permission for this "
            "bucket or prefix",
            path=where,
        )
    if "not partial" in low or "range request not supported" in low or "non-partial" in low:
        return RangeNotSupportedError(errno.EIO, f"{where}: the server ignored a Range request")
    if any(
        t in low
        for t in ("connection refused", "tcp connect error", "dns error", "error sending request",
                  "failed to lookup address", "connection reset")
    ):  # fmt: skip
        return OSError(
            errno.ECONNREFUSED,
            f"cannot reach the server of {where} ({first}); check the URL, the endpoint "
            "(AWS_ENDPOINT_URL for an S3-compatible server) and the network",
            where,
        )
    if "encountered object with invalid path" in low:
        # object_store (under obstore) fails a whole listing on one key it cannot parse (an
        # empty segment from a path joined as ``run//x``, or a ``..``); there is no listing
        # that skips it, so the message names the key and what to do.
        return OSError(
            errno.EINVAL,
            f"{first}; an object in this folder has a key that cannot be listed (an empty "
            "segment `//` or a `..`, not written by savegame): delete or rename it, e.g. with "
            "`aws s3 rm`, and run again",
            where,
        )
    if isinstance(exc, ValueError) or name in ("UnknownConfigurationKeyError", "InvalidPathError"):
        return errors.UnsupportedURLError(f"{where}: {first}", path=where)
    if isinstance(exc, OSError) and exc.errno is not None:
        return type(exc)(exc.errno, redact_text(exc.strerror or first), where)
    return OSError(errno.EIO, f"{first}", where)


def quote_key(key: str) -> str:
    """``key`` as it may appear in a URL path (for messages that print a full object URL)."""
    return quote(key, safe="/")
