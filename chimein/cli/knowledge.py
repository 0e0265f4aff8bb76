"""`chimein knowledge`: index a folder of the group's documents and try questions on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chimein.cli.common import app, console, fail

knowledge_app = typer.Typer(help="Index the group's documents (a folder of Markdown and text files) for retrieval.",
                            no_args_is_help=True)
app.add_typer(knowledge_app, name="knowledge")


def _open(path: Path, rebuild: bool):
    from chimein.knowledge.index import KnowledgeError, KnowledgeIndex
    from chimein.models.loading import quiet

    try:
        with console.status(f"indexing {path}"), quiet():
            return KnowledgeIndex.open(path, rebuild=rebuild)
    except KnowledgeError as e:
        fail(str(e))


@knowledge_app.command("build")
def build(
    path: Annotated[Path, typer.Argument(help="A folder of Markdown (.md) and text (.txt) files, searched recursively.")],
    rebuild: Annotated[bool, typer.Option(help="Rebuild even when the saved index matches the files.")] = False,
) -> None:
    """Cut the folder's files into passages and index them (BM25 + MiniLM embeddings); report what
    was indexed and what was skipped, and why. The index is saved in PATH/.chimein-index/."""
    from rich.markup import escape

    from chimein.knowledge.index import INDEX_DIR

    index, report = _open(path, rebuild)
    sources = {}
    for p in index.passages:
        sources[p.source] = sources.get(p.source, 0) + 1
    table = Table("file", "passages")
    for source, n in sources.items():
        table.add_row(escape(source), str(n))
    console.print(table)
    if report.skipped:
        skipped = Table("file", "why", title=f"skipped ({len(report.skipped)})")
        for name, why in report.skipped:
            skipped.add_row(escape(name), why)
        console.print(skipped)
    console.print(f"{path}: {report.files} files, {report.passages} passages; "
                  f"{'built' if report.rebuilt else 'up to date'}: {path / INDEX_DIR}", highlight=False, soft_wrap=True)


@knowledge_app.command("search")
def search(
    path: Annotated[Path, typer.Argument(help="The folder (indexed first if needed).")],
    query: Annotated[str, typer.Argument(help="A question, as someone in the chat would ask it.")],
    k: Annotated[int, typer.Option(min=1, help="How many passages.")] = 3,
) -> None:
    """The passages a question retrieves, best first, with their rank in each ranking (and the
    cosine similarity of the dense one). A passage without a lexical rank shares no word with the
    question: it is never shown to the model with a message."""
    from rich.markup import escape

    from chimein.models.loading import quiet

    index, _ = _open(path, False)
    with quiet():  # the embedding model loads here when the index was up to date
        hits = index.search(query, k)
    table = Table("#", "passage", "lexical", "dense", title=escape(query))
    for n, hit in enumerate(hits, 1):
        table.add_row(str(n), escape(hit.passage.render()), str(hit.lexical or "-"),
                      f"{hit.dense} ({hit.similarity:.2f})" if hit.dense else "-")
    console.print(table)
