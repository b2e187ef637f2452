"""`python -m services.template`: serves the prompt templates on port 50052."""
import sys

from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from services.template.catalog import TemplateFileError
from services.template.servicer import build_spec
from services.template.settings import TemplateSettings


def main() -> int:
    settings = TemplateSettings.load()
    configure_tracing("template", settings.trace_dir, settings.capture_content)
    try:
        run(build_spec, settings)
    except TemplateFileError as error:
        print(f"template: cannot start: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
