"""The edge's certificate, re-read when its files change (`nlpmesh certs rotate`), as the gRPC services do theirs.

New connections get the new pair; connections already open keep theirs. A pair that does not load (a key that is
not the certificate's, a file half written) is not served: the old one stays, and a WARNING says so.
"""
from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

log = logging.getLogger("nlpmesh.edge")


class CertificateWatcher:
    def __init__(self, context: ssl.SSLContext, cert_file: Path, key_file: Path, every_s: float = 1.0):
        self._context, self._cert_file, self._key_file, self._every_s = context, cert_file, key_file, every_s
        self._stamp = self._read_stamp()
        self._stop = threading.Event()

    def _read_stamp(self) -> tuple:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (self._cert_file.stat(), self._key_file.stat()))
        except OSError:
            return ()

    def check(self) -> bool:
        """Loads the files when they changed since the last look; whether the served pair is new."""
        stamp = self._read_stamp()
        if stamp == self._stamp or not stamp:
            return False
        self._stamp = stamp
        try:
            self._context.load_cert_chain(self._cert_file, self._key_file)
        except (OSError, ssl.SSLError) as error:
            log.warning("edge: the changed certificate and key are not served (%s); the previous pair stays",
                        type(error).__name__)
            return False
        log.info("edge: serving the new certificate from %s", self._cert_file)
        return True

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self._every_s):
                self.check()

        threading.Thread(target=loop, name="edge-certificate-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
