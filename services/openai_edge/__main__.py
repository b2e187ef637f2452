"""`python -m services.openai_edge`: OpenAI's HTTP API on port 50056, each call made to the gateway.

TLS as at the gateway: with the mesh's certificates (tls_dir) it serves HTTPS with edge.crt and calls the gateway
over TLS, verified with the mesh CA; without them, plaintext both ways.
"""
import contextlib
import logging
import signal
import sys

import uvicorn

from meshkit.metrics import start_metrics_server
from meshkit.ports import PortInUse, port_in_use
from meshkit.server import PORT_IN_USE_EXIT, configure_logging
from meshkit.tls import TlsConfig
from services.openai_edge.app import build_app
from services.openai_edge.gateway_calls import Gateway
from services.openai_edge.settings import EdgeSettings
from services.openai_edge.tls_reload import CertificateWatcher

log = logging.getLogger("nlpmesh.edge")


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """SIGTERM and SIGINT drain (grace_s) and the process exits 0, as every service does; uvicorn's own
        re-raises the signal once drained, which ends the process as killed by it."""
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self.handle_exit)
        yield


def main() -> int:
    settings = EdgeSettings.load()
    configure_logging(settings.log_level, settings.log_format, settings.capture_content)
    if port_in_use(settings.address):
        log.error("edge: %s is in use by another process: not starting", settings.address)
        return PORT_IN_USE_EXIT
    try:
        start_metrics_server(settings)
    except PortInUse as error:
        log.error("%s: not starting", error)
        return PORT_IN_USE_EXIT
    tls = TlsConfig.from_settings(settings)
    gateway = Gateway(settings.gateway_addr, tls.ca_file if tls.serves_tls else None, settings.timeout_s)
    app = build_app(gateway, settings.max_body_bytes)
    ssl = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)} if tls.serves_tls else {}
    log.info("edge: serving OpenAI's API on %s (%s), gateway %s", settings.address,
             "HTTPS" if tls.serves_tls else "plaintext HTTP", settings.gateway_addr)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level.lower(), access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.grace_s, http="httptools",
                            loop="uvloop" if settings.event_loop == "uvloop" else "asyncio", **ssl)
    if tls.serves_tls:
        config.load()  # the SSL context, made now so that the watcher swaps its pair when the files change
        CertificateWatcher(config.ssl, tls.cert_file, tls.key_file).start()
    Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
