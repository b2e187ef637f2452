"""`python -m services.cache`: the prompt cache service (default port 50054)."""
from meshkit.server import run
from services.cache.servicer import build_spec
from services.cache.settings import CacheSettings


def main() -> None:
    settings = CacheSettings.load()
    run(build_spec, settings)


if __name__ == "__main__":
    main()
