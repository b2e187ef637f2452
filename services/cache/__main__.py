"""`python -m services.cache`: the prompt cache service (default port 50054)."""
from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from services.cache.servicer import build_spec
from services.cache.settings import CacheSettings


def main() -> None:
    settings = CacheSettings.load()
    configure_tracing("cache", settings.trace_dir, settings.capture_content)
    run(build_spec, settings)


if __name__ == "__main__":
    main()
