"""`python -m modelfiles convert`: the one-time model conversion (make setup)."""
import argparse
import sys

from meshkit.settings import default_home
from modelfiles.convert import ensure_converted


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfiles")
    parser.add_argument("command", choices=["convert"])
    parser.parse_args()
    files = ensure_converted(default_home(), progress=lambda line: print(f"[model] {line}", flush=True))
    print(f"[model] ready: {files.name} revision {files.revision} at {files.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
