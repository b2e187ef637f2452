"""`python -m services.tokenizer`: serves the models' tokenizers and chat templates on port 50053."""
from meshkit.server import run
from meshkit.tracing.provider import configure_tracing
from services.tokenizer.servicer import build_spec
from services.tokenizer.settings import TokenizerSettings


def main() -> None:
    settings = TokenizerSettings.load()
    configure_tracing("tokenizer", settings.trace_dir, settings.capture_content)
    run(build_spec, settings)


if __name__ == "__main__":
    main()
