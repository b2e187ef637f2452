"""`nlpmesh models list`: each catalogue model, where it comes from, its revision and whether it is converted."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshkit.settings import default_home
from modelfiles.architectures import UnsupportedArchitecture, check_convertible, engine_supports
from modelfiles.catalogue import Catalogue, CatalogueError, CatalogueModel, load_catalogue
from modelfiles.convert import ModelNotConverted, converted_revision, load_model_files
from modelfiles.embedding import max_seq_length
from modelfiles.sources import SourceError, inspect, locate, revision

COLUMNS = ("ID", "SOURCE", "REVISION", "ARCHITECTURE", "CONTEXT", "CONVERTED", "PRECISION")


@dataclass(frozen=True)
class ModelRow:
    cells: tuple[str, ...]
    problem: str | None  # one line when the source is missing, unreadable or unsupported


def model_row(model: CatalogueModel, home: Path) -> ModelRow:
    if model.external is not None:  # served by its engine: only its tokenizer entry's files are the mesh's
        urls = model.external.urls
        where = f"{model.external.kind} {urls[0]}" + (f" (+{len(urls) - 1})" if len(urls) > 1 else "")
        tokenizer = "yes" if converted_revision(home, model.files_id) is not None else "no"
        return ModelRow((model.id, where, "-", f"external: {model.external.served_model}",
                         str(model.context_length or "-"), f"tokenizer of {model.files_id}: {tokenizer}", "-"), None)
    if model.task == "embedding":
        return _embedding_row(model, home)
    precision = "auto (chosen at start)" if "auto" in model.precisions else "/".join(model.precisions)
    try:
        files = locate(model)
        facts = inspect(files)
        check_convertible(model.id, facts.architecture)
        current = revision(files, model.chat_template)
    except (SourceError, UnsupportedArchitecture) as error:
        return ModelRow((model.id, model.source.describe(), "-", "-", "-", "no", precision), str(error))
    converted = converted_revision(home, model.id)
    state = "yes" if converted == current else "no" if converted is None else f"stale ({converted})"
    engine = "" if engine_supports(facts.architecture) else " (engine: not yet)"
    context = model.context_length or facts.context_length
    return ModelRow((model.id, model.source.describe(), current, facts.architecture + engine,
                     str(context) if context else "-", state, precision), None)


def _embedding_row(model: CatalogueModel, home: Path) -> ModelRow:
    """An embedding model (services/embedding): unpacked, not converted; its context is its token limit per text."""
    precision = "auto (chosen at start)"
    try:
        current = revision(locate(model), None)
    except SourceError as error:
        return ModelRow((model.id, model.source.describe(), "-", "embedding", "-", "no", precision), str(error))
    converted = converted_revision(home, model.id)
    state = "yes" if converted == current else "no" if converted is None else f"stale ({converted})"
    architecture, limit = "embedding", model.max_tokens
    if converted is not None:
        folder = load_model_files(home, model.id)
        architecture = f"embedding: {folder.architecture}"
        limit = limit or max_seq_length(folder.path)
    return ModelRow((model.id, model.source.describe(), current, architecture, str(limit or "-"), state, precision),
                    None)


def models_table(catalogue: Catalogue, home: Path) -> tuple[int, str]:
    """The table, then one line per model that cannot be served; 1 if there is any."""
    rows = [model_row(model, home) for model in catalogue.models]
    widths = [max(len(COLUMNS[i]), *(len(row.cells[i]) for row in rows)) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
             for cells in (COLUMNS, *(row.cells for row in rows))]
    lines.append(f"catalogue: {catalogue.path}; converted models in {home / 'models'}")
    problems = [row.problem for row in rows if row.problem]
    lines += [f"refused: {problem}" for problem in problems]
    return (1 if problems else 0), "\n".join(lines)


def servable_models(home: Path) -> tuple[list[str], list[str]]:
    """The catalogue ids this mesh can serve here now (converted, of an architecture the built-in engine runs; an
    external engine's entry: its tokenizer entry converted), in the catalogue's order; and one line for each of
    the others, saying why not."""
    servable, not_served = [], []
    catalogue = load_catalogue()
    for model in catalogue.ids:
        files_id = catalogue.get(model).files_id  # an external engine's entry: its tokenizer entry
        try:
            architecture = load_model_files(home, files_id).architecture
        except ModelNotConverted:
            not_served.append(f"{model}: not converted (python -m modelfiles convert --model {files_id})")
            continue
        if files_id != model or engine_supports(architecture):  # an external engine runs its own model
            servable.append(model)
        else:
            not_served.append(f"{model}: the built-in engine does not run {architecture} models yet")
    return servable, not_served


def cmd_list(args) -> int:
    try:
        catalogue = load_catalogue(Path(args.file) if args.file else None)
    except CatalogueError as error:
        print(f"[nlpmesh] {error}")
        return 2
    code, text = models_table(catalogue, default_home())
    print(text)
    return code


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="the model catalogue: what this mesh may serve")
    actions = models.add_subparsers(dest="models_command", required=True)
    listing = actions.add_parser("list", help="each model: id, source, revision, architecture, context, "
                                              "converted or not, precision")
    listing.add_argument("--file", help="the catalogue (default: $NLPMESH_MODELS_FILE, else deploy/models.toml)")
    listing.set_defaults(run=cmd_list)
