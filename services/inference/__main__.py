"""`python -m services.inference`: serves one catalogue model (NLPMESH_INFERENCE_MODEL) on port 50055.

A model whose catalogue entry names an external engine is served by its adapter (services/inference/external),
in this process, without loading the built-in engine."""
import os
import sys

from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from modelfiles.catalogue import CatalogueError, load_catalogue
from services.inference.external.settings import AdapterSettings


def _external(model: str) -> bool:
    """Whether ``model``'s catalogue entry names an external engine; False where the catalogue lacks it or is
    unreadable: the built-in path then refuses to start with that error in one line (``load_engine``)."""
    try:
        catalogue = load_catalogue()
        return catalogue.get(model or catalogue.ids[0]).external is not None
    except CatalogueError:
        return False


def main() -> int:
    if _external(AdapterSettings.load().model):
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
