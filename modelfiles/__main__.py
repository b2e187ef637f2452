"""`python -m modelfiles convert [--model ID]`: the one-time conversion of every catalogue model (make setup)."""
import argparse
import sys

from meshkit.settings import default_home
from modelfiles.architectures import UnsupportedArchitecture
from modelfiles.catalogue import CatalogueError, load_catalogue
from modelfiles.convert import ensure_converted
from modelfiles.embedding import ensure_unpacked
from modelfiles.sources import SourceError


def _say(line: str) -> None:
    print(f"[model] {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfiles")
    parser.add_argument("command", choices=["convert"])
    parser.add_argument("--model", action="append", metavar="ID",
                        help="convert only this catalogue model (repeatable; default: every one)")
    args = parser.parse_args(argv)
    try:
        catalogue = load_catalogue()
        named = [catalogue.get(model_id) for model_id in args.model] if args.model else list(catalogue.models)
        # An external engine's entry has nothing to convert but the built-in entry whose tokenizer it shares.
        models = [catalogue.get(files_id) for files_id in dict.fromkeys(model.files_id for model in named)]
    except CatalogueError as error:
        _say(str(error))
        return 2
    _say(f"{len(models)} model(s) from {catalogue.path}: {', '.join(model.id for model in models)}")
    failed = 0
    for model in models:
        try:
            convert = ensure_unpacked if model.task == "embedding" else ensure_converted
            files = convert(default_home(), model, progress=_say)
        except (SourceError, UnsupportedArchitecture) as error:
            _say(f"refused: {error}")
            failed += 1
            continue
        _say(f"ready: {files.model_id} ({files.name}) revision {files.revision} at {files.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
