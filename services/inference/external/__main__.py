"""`python -m services.inference.external`: serves one catalogue model whose entry names an external engine
(NLPMESH_INFERENCE_MODEL) on the inference port, 50055."""
import sys

from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from services.inference.external.servicer import build_spec
from services.inference.external.settings import AdapterSettings


def main() -> int:
    settings = AdapterSettings.load()
    configure_tracing("inference", settings.trace_dir, settings.capture_content)
    run(build_spec, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
