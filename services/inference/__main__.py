"""`python -m services.inference`: serves one catalogue model (NLPMESH_INFERENCE_MODEL) on port 50055.

A model whose catalogue entry names an external engine is served by its adapter (services/inference/external),
in this process, without loading the built-in engine."""
import os
import sys

from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from modelfiles.catalogue import load_catalogue
from services.inference.external.settings import AdapterSettings


def main() -> int:
    catalogue = load_catalogue()
    if catalogue.get(AdapterSettings.load().model or catalogue.ids[0]).external is not None:
        from services.inference.external.__main__ import main as adapter_main

        return adapter_main()
    from services.inference.servicer import build_spec
    from services.inference.settings import InferenceSettings

    settings = InferenceSettings.load()
    os.nice(settings.niceness)
    configure_tracing("inference", settings.trace_dir, settings.capture_content)
    run(build_spec, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
