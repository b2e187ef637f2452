"""`python -m services.template`: serves the prompt templates on port 50052."""
import sys

from meshkit.server import run
from services.template.catalog import TemplateFileError
from services.template.servicer import build_spec
from services.template.settings import TemplateSettings


def main() -> int:
    settings = TemplateSettings.load()
    try:
        run(build_spec, settings)
    except TemplateFileError as error:
        print(f"template: cannot start: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
