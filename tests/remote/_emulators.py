"""GCS and Azure emulators on loopback for ``test_gcs_azure_stores.py`` (issue 11): what each is,
how it is started, and how savegame is pointed at it — the same environment variables a user
sets for a real emulator (docs/remote.md, "URLs and credentials").

- :class:`Azurite`: Microsoft's Azure Storage emulator (the npm package ``azurite``), its blob
  service started as a subprocess (``azurite-blob``) on a free port, in memory. savegame reaches
  it with ``AZURE_STORAGE_USE_EMULATOR=true`` and ``AZURITE_BLOB_STORAGE_URL`` (obstore then
  uses the emulator's well-known account ``devstoreaccount1`` and key, and allows plain http).
  Containers are created here with one SharedKey-signed request (obstore has no call for it).
- :class:`GcpStorageEmulator`: the PyPI package ``gcp-storage-emulator``, in this process. It
  implements the GCS *JSON* API only; obstore speaks the *XML* API (``PUT /bucket/key``,
  ``HEAD``, ``GET ?list-type=2``, ``POST ?uploads``), so savegame cannot use it: the tests
  record that, exactly, and that savegame fails with a typed error rather than silently.

Each ``start`` waits until the port answers, and ``close`` stops the process (or thread).
Nothing here needs the network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import http.client
import json
import shutil
import subprocess
import time
from pathlib import Path

from .servers import free_port

__all__ = ["Azurite", "GcpStorageEmulator", "azurite_exe"]

#: Azurite's well-known development account and key (public, documented by Microsoft; the
#: same ones obstore's ``use_emulator`` uses).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(
                    f"emulator exited with {proc.returncode} before listening: {err[-500:]}"
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"emulator not listening on 127.0.0.1:{port} after {timeout} s"
                ) from None
            time.sleep(0.05)


# ---- Azure: azurite ----------------------------------------------------------------------------
def azurite_exe() -> str | None:
    """The ``azurite-blob`` command, or None when azurite is not installed
    (``npm install -g azurite``; CI without node has none)."""
    return shutil.which("azurite-blob")


class Azurite:
    """azurite's blob service on 127.0.0.1, in memory (``--inMemoryPersistence``)."""

    def __init__(self, exe: str, timeout: float = 60.0) -> None:
        # Node's start-up is seconds on a loaded machine: a generous wait. A port taken between
        # free_port() and azurite's bind makes it exit at once: another port is tried.
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self._proc = subprocess.Popen(
                [exe, "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                 "--inMemoryPersistence", "--silent", "--disableTelemetry",
                 "--skipApiVersionCheck"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                _wait_port(self.port, self._proc, timeout)
                break
            except RuntimeError:
                self.close()
                if attempt == 2:
                    raise
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        self.version = out.stdout.strip() or "unknown"

    def env(self) -> dict[str, str]:
        """What a user sets to point savegame (obstore) at azurite."""
        return {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": self.url}

    def create_container(self, name: str) -> None:
        """PUT ``?restype=container``, signed with the dev account's SharedKey (the signature
        scheme of learn.microsoft.com "Authorize with Shared Key"; written here because obstore
        cannot create containers and the Azure SDK is not a test dependency)."""
        headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
        canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        # Path-style emulator URLs put the account in the path too: it appears twice.
        resource = f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
        to_sign = "PUT\n" + "\n" * 11 + canonical + resource
        key = base64.b64decode(AZURITE_KEY)
        sig = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(
                "PUT", f"/{AZURITE_ACCOUNT}/{name}?restype=container", body=b"",
                headers={**headers, "Authorization": f"SharedKey {AZURITE_ACCOUNT}:{sig}"},
            )  # fmt: skip
            res = conn.getresponse()
            body = res.read()
        finally:
            conn.close()
        if res.status != 201:
            raise RuntimeError(f"azurite: creating container {name!r}: {res.status} {body[:300]!r}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()


# ---- GCS: gcp-storage-emulator ------------------------------------------------------------------
class GcpStorageEmulator:
    """``gcp-storage-emulator`` (PyPI) in this process, in memory, on a free port."""

    def __init__(self, workdir: Path) -> None:
        import logging
        from importlib.metadata import version

        from gcp_storage_emulator.server import create_server

        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # a log per request
        self.version = version("gcp-storage-emulator")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = create_server("127.0.0.1", self.port, in_memory=True)
        self._server.start()
        _wait_port(self.port, None, 10.0)
        # obstore's documented way to an emulator: a service-account file naming the base URL,
        # OAuth off (obstore/_store/_gcs.pyi, ``service_account``).
        self.service_account = workdir / "gcs-emulator-account.json"
        self.service_account.write_text(json.dumps({
            "gcs_base_url": self.url, "disable_oauth": True,
            "client_email": "", "private_key": "", "private_key_id": "",
        }))  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"GOOGLE_SERVICE_ACCOUNT": str(self.service_account)}

    def make_bucket(self, name: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/storage/v1/b", body=json.dumps({"name": name}),
                         headers={"Content-Type": "application/json"})  # fmt: skip
            res = conn.getresponse()
            body = res.read()
        finally:
            conn.close()
        if res.status != 200:
            raise RuntimeError(
                f"gcp-storage-emulator: bucket {name!r}: {res.status} {body[:300]!r}"
            )

    def close(self) -> None:
        self._server.stop()
