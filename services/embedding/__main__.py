"""`python -m services.embedding`: serves an embedding model of the catalogue on port 50057."""
from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from services.embedding.servicer import build_spec
from services.embedding.settings import EmbeddingSettings


def main() -> None:
    settings = EmbeddingSettings.load()
    configure_tracing("embedding", settings.trace_dir, settings.capture_content)
    run(build_spec, settings)


if __name__ == "__main__":
    main()
