"""`python -m services.inference`: serves one catalogue model (NLPMESH_INFERENCE_MODEL) on port 50055."""
import os
import sys

from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from services.inference.servicer import build_spec
from services.inference.settings import InferenceSettings


def main() -> int:
    settings = InferenceSettings.load()
    os.nice(settings.niceness)
    configure_tracing("inference", settings.trace_dir, settings.capture_content)
    run(build_spec, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
