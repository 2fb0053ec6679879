"""Multi-label data sets for the quality benchmark, built offline from package-installed sources.

    python -m benchmarks.quality.datasets                 # build (once) and describe the default sets
    python -m benchmarks.quality.datasets wordnet debtags  # only these
    python -m benchmarks.quality.datasets --large         # also the Amazon-670K-shaped sets (GBs, slow)

    from benchmarks.quality.datasets import load, NAMES
    train, test = load("wordnet")                        # engine.Dataset pair, cached under bench-data/quality/

Every set is built on first use, deterministically (fixed seeds, sorted vocabularies), and cached as
XMC text (`train.txt`, `test.txt`) plus engine dataset directories (`train/`, `test/`, read back with
`engine.load_dataset`) and `labels.txt` (one label name per line, where labels have names). Features
and IDF weights of the text sets are fitted on the training split only; points left without a
feature or a label are dropped. Splits are fixed, seeded permutations (80 % train, 20 % test).

Sets (`NAMES`, the default run; `LARGE_NAMES` behind `--large`):

- `wordnet`: WordNet 3.0 noun and verb synsets (Debian package `wordnet-base`). Features: TF-IDF of
  the synset's words and gloss (definition and examples). Labels: all its hypernyms and their
  ancestors (instance hypernyms included), except labels carried by more than 10 % of the points
  (the few roots such as `entity`, which would make P@1 trivial). ~16k labels.
- `wordnet-top`: the same points and features; labels: the synset's lexicographer file (noun.animal,
  verb.motion, ...), its noun ancestors at depth 2-3 below the root (with the same 10 % cut) and its
  verb roots. ~530 labels.
- `debtags`: the Debian packages that carry debtags, from the apt package lists that `apt-get update`
  leaves in /var/lib/apt/lists/*_Packages.lz4. Features: TF-IDF of the package name, its description
  and the names of the packages it depends on or recommends (as `dep:NAME` tokens). Labels: its
  debtags (`implemented-in::c`, `interface::x11`, ...) and its section (`section::net`). Debian's
  lists hold the short description only (the long ones are in Translation-* files, which apt fetches
  only with Acquire::Languages set; they are not used, so the set does not depend on that setting).
  The set follows the lists' snapshot: `meta.json` records their SHA-256.
- `synth-small`: `engine.synth`'s `small` preset (topics of co-occurring labels with their own
  vocabularies), seed 0.
- `sparselinear`: `benchmarks.quality.sparselinear`, a generator of another kind: points mix
  overlapping feature clusters; each label is a sparse linear function of the TF-IDF input (support
  in one or two clusters); label frequencies follow a power law, each label goes to the points with
  the highest noisy scores, and a share of label entries is replaced at random.
- `synth-amazon670k`, `sparselinear-amazon670k` (`--large`): both generators at Amazon-670K's shape.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import Dataset, load_dataset, save_dataset, write_xmc  # noqa: E402

DEFAULT_ROOT = ROOT / "bench-data" / "quality"
BUILD_VERSION = 1
"""Bump when a builder changes what it produces: cached sets of another version are rebuilt."""
SEED = 0
TEST_FRACTION = 0.2
WORDNET_DIR = Path("/usr/share/wordnet")
APT_LISTS = Path("/var/lib/apt/lists")
MAX_LABEL_SHARE = 0.1
"""WordNet labels carried by more than this share of points are dropped (roots such as `entity`)."""

__all__ = ["NAMES", "LARGE_NAMES", "ALL_NAMES", "DEFAULT_ROOT", "load", "describe", "DataSourceMissing"]


class DataSourceMissing(RuntimeError):
    """The package a real set is built from is not installed; the message says how to install it."""


# ------------------------------------------------------------------------------------------------
# shared helpers


def _split(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test row ids of a fixed, seeded 80/20 permutation of n points."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * TEST_FRACTION))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _labels_csr(label_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(label_lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(ls) for ls in label_lists])
    indices = np.fromiter((i for ls in label_lists for i in sorted(ls)), dtype=np.int32, count=int(indptr[-1]))
    return indptr, indices


def _dataset(x, y_indptr: np.ndarray, y_indices: np.ndarray, num_labels: int) -> Dataset:
    """An engine Dataset from a scipy CSR feature matrix and label CSR arrays."""
    x = x.tocsr().astype(np.float32)
    x.sort_indices()
    return Dataset(
        np.asarray(x.indptr, dtype=np.int64),
        np.asarray(x.indices, dtype=np.int32),
        np.asarray(x.data, dtype=np.float32),
        y_indptr,
        y_indices,
        int(x.shape[1]),
        int(num_labels),
    )


def _take(x, label_lists: list[list[int]], rows: np.ndarray, num_labels: int) -> Dataset:
    yp, yi = _labels_csr([label_lists[r] for r in rows])
    return _dataset(x[rows], yp, yi, num_labels)


def _text_sets(
    docs: list,
    label_lists: list[list[int]],
    label_names: list[str],
    analyzer: str | Callable = "word",
) -> tuple[Dataset, Dataset, list[str]]:
    """TF-IDF (fitted on the training split) of docs; drop points without labels or features."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    keep = [i for i, ls in enumerate(label_lists) if ls]
    docs = [docs[i] for i in keep]
    label_lists = [label_lists[i] for i in keep]
    train_rows, test_rows = _split(len(docs))
    vec = TfidfVectorizer(analyzer=analyzer, sublinear_tf=True, min_df=2, dtype=np.float32)
    vec.fit([docs[i] for i in train_rows])
    x = vec.transform(docs)
    nonempty = np.diff(x.indptr) > 0
    train_rows, test_rows = train_rows[nonempty[train_rows]], test_rows[nonempty[test_rows]]
    # Labels no training point carries stay (a test point may have them): ids must cover both splits.
    return (
        _take(x, label_lists, train_rows, len(label_names)),
        _take(x, label_lists, test_rows, len(label_names)),
        label_names,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# WordNet


LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
"""WordNet 3.0's lexicographer files by number (wndb(5WN), lexnames(5WN))."""


def _wordnet_files() -> list[Path]:
    files = [WORDNET_DIR / "data.noun", WORDNET_DIR / "data.verb"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataSourceMissing(
            f"the WordNet sets are built from Debian's wordnet-base package, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: run `apt-get install -y wordnet-base` (as root)"
        )
    return files


def parse_wordnet(files: list[Path]) -> list[dict]:
    """Synsets of WordNet `data.*` files: key, lexfile, words, hypernym keys (@ and @i), gloss."""
    synsets = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                tok = head.split()
                offset, lexfile, pos = tok[0], int(tok[1]), tok[2]
                pos = "n" if pos == "n" else "v"  # only nouns and verbs are read
                w_cnt = int(tok[3], 16)
                words = [tok[4 + 2 * i] for i in range(w_cnt)]
                i = 4 + 2 * w_cnt
                p_cnt = int(tok[i])
                hypernyms = []
                for j in range(p_cnt):
                    sym, target, tpos = tok[i + 1 + 4 * j], tok[i + 2 + 4 * j], tok[i + 3 + 4 * j]
                    if sym in ("@", "@i"):
                        hypernyms.append(f"{tpos}{target}")
                synsets.append(
                    {
                        "key": f"{pos}{offset}",
                        "lexfile": lexfile,
                        "words": [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in words],
                        "hypernyms": hypernyms,
                        "gloss": gloss.strip(),
                    }
                )
    return synsets


def _wordnet_graph(synsets: list[dict]) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Every synset's ancestors (transitive hypernyms) and its depth (shortest path to a root)."""
    parents = {s["key"]: s["hypernyms"] for s in synsets}
    ancestors: dict[str, set[str]] = {}
    depth: dict[str, int] = {}

    def visit(key: str) -> None:
        stack = [(key, False)]
        while stack:
            k, done = stack.pop()
            if k in ancestors:
                continue
            if done:
                anc: set[str] = set()
                d = 0 if not parents[k] else None
                for p in parents[k]:
                    anc.add(p)
                    anc |= ancestors[p]
                    d = depth[p] + 1 if d is None else min(d, depth[p] + 1)
                ancestors[k], depth[k] = anc, d
            else:
                stack.append((k, True))
                stack.extend((p, False) for p in parents[k] if p not in ancestors)

    for key in parents:
        visit(key)
    return ancestors, depth


def _wordnet_sets(small: bool) -> tuple[Dataset, Dataset, list[str]]:
    synsets = parse_wordnet(_wordnet_files())
    ancestors, depth = _wordnet_graph(synsets)
    name_of = {s["key"]: s["words"][0] for s in synsets}
    raw = []
    for s in synsets:
        anc = ancestors[s["key"]]
        if small:  # noun ancestors at depth 2-3, verb roots, the lexicographer file
            labels = {a for a in anc if (a[0] == "n" and 2 <= depth[a] <= 3) or (a[0] == "v" and depth[a] == 0)}
            labels.add(f"lex:{LEXNAMES[s['lexfile']]}")
        else:
            labels = set(anc)
        raw.append(labels)
    counts: dict[str, int] = {}
    for labels in raw:
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
    cap = MAX_LABEL_SHARE * len(raw)
    vocab = sorted(k for k, c in counts.items() if c <= cap or k.startswith("lex:"))
    index = {k: i for i, k in enumerate(vocab)}
    label_lists = [[index[k] for k in labels if k in index] for labels in raw]
    docs = [" ; ".join(s["words"]) + " | " + s["gloss"] for s in synsets]
    names = [k if k.startswith("lex:") else f"{k}:{name_of[k]}" for k in vocab]
    return _text_sets(docs, label_lists, names)


def build_wordnet() -> tuple[Dataset, Dataset, list[str], dict]:
    return (*_wordnet_sets(small=False), {"source": _source_meta(_wordnet_files())})


def build_wordnet_top() -> tuple[Dataset, Dataset, list[str], dict]:
    return (*_wordnet_sets(small=True), {"source": _source_meta(_wordnet_files())})


# ------------------------------------------------------------------------------------------------
# Debian package lists (debtags)


def _package_lists() -> list[Path]:
    files = sorted(APT_LISTS.glob("*_Packages.lz4"))
    if not files:
        raise DataSourceMissing(
            f"the debtags set is built from the apt package lists, and {APT_LISTS}/*_Packages.lz4 is missing: "
            "run `apt-get update` (as root)"
        )
    return files


def _read_lz4(path: Path) -> str:
    try:
        import lz4.frame
    except ImportError as e:  # the bench extra installs it
        raise DataSourceMissing("reading the apt lists needs the lz4 module: pip install -e '.[bench]'") from e
    with lz4.frame.open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


_FIELD = re.compile(r"^([A-Za-z0-9-]+):[ \t]?(.*)$")
_DEP_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9+.-]*)")
_WORD = re.compile(r"(?u)\b\w\w+\b")


def parse_packages(text: str) -> list[dict]:
    """Stanzas of a Debian Packages file as {field: value} (continuation lines joined with newlines)."""
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in stanza.split("\n"):
            if line.startswith((" ", "\t")) and last:
                fields[last] += "\n" + line.strip()
                continue
            m = _FIELD.match(line)
            if m:
                last = m.group(1)
                fields[last] = m.group(2)
        if "Package" in fields:
            out.append(fields)
    return out


def _dep_names(value: str) -> list[str]:
    names = []
    for alt in re.split(r"[,|]", value):
        m = _DEP_NAME.match(alt)
        if m:
            names.append(m.group(1))
    return names


def _package_tokens(doc: tuple[str, str, list[str]]) -> list[str]:
    name, text, deps = doc
    return _WORD.findall(f"{name.replace('-', ' ')} {name} {text}".lower()) + [f"dep:{d}" for d in deps]


def build_debtags() -> tuple[Dataset, Dataset, list[str], dict]:
    files = _package_lists()
    seen: set[str] = set()
    docs, raw = [], []
    for path in files:
        for p in parse_packages(_read_lz4(path)):
            if "Tag" not in p or p["Package"] in seen:
                continue
            seen.add(p["Package"])
            tags = {t.strip() for t in p["Tag"].replace("\n", " ").split(",") if t.strip()}
            if "Section" in p:
                tags.add("section::" + p["Section"].split("/")[-1])
            deps = _dep_names(p.get("Depends", "") + "," + p.get("Pre-Depends", "") + "," + p.get("Recommends", ""))
            docs.append((p["Package"], p.get("Description", ""), sorted(set(deps))))
            raw.append(tags)
    order = sorted(range(len(docs)), key=lambda i: docs[i][0])  # independent of the lists' order
    docs, raw = [docs[i] for i in order], [raw[i] for i in order]
    vocab = sorted(set().union(*raw))
    index = {k: i for i, k in enumerate(vocab)}
    label_lists = [[index[k] for k in tags] for tags in raw]
    return (*_text_sets(docs, label_lists, vocab, analyzer=_package_tokens), {"source": _source_meta(files)})


def _source_meta(files: list[Path]) -> list[dict]:
    return [{"path": str(f), "sha256": _sha256(f)} for f in files]


# ------------------------------------------------------------------------------------------------
# synthetic


def build_engine_synth(preset: str) -> Callable[[], tuple[Dataset, Dataset, list[str] | None, dict]]:
    def build():
        from engine.synth import PRESETS, generate

        train, test = generate(preset, seed=SEED)
        return train, test, None, {"source": f"engine.synth preset {preset!r}, seed {SEED}", **_params(PRESETS[preset])}

    return build


def build_sparselinear(shape: str) -> Callable[[], tuple[Dataset, Dataset, list[str] | None, dict]]:
    def build():
        from benchmarks.quality.sparselinear import PRESETS, generate

        train, test = generate(PRESETS[shape], seed=SEED)
        return train, test, None, {"source": f"sparselinear preset {shape!r}, seed {SEED}", **_params(PRESETS[shape])}

    return build


def _params(p) -> dict:
    import dataclasses

    return {"params": dataclasses.asdict(p)}


# ------------------------------------------------------------------------------------------------
# registry, cache, CLI

BUILDERS: dict[str, Callable[[], tuple[Dataset, Dataset, list[str] | None, dict]]] = {
    "wordnet": build_wordnet,
    "wordnet-top": build_wordnet_top,
    "debtags": build_debtags,
    "synth-small": build_engine_synth("small"),
    "sparselinear": build_sparselinear("default"),
    "synth-amazon670k": build_engine_synth("amazon670k"),
    "sparselinear-amazon670k": build_sparselinear("amazon670k"),
}
NAMES = ["wordnet", "wordnet-top", "debtags", "synth-small", "sparselinear"]
LARGE_NAMES = ["synth-amazon670k", "sparselinear-amazon670k"]
ALL_NAMES = NAMES + LARGE_NAMES


def _cached(d: Path) -> bool:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("build_version") == BUILD_VERSION and (d / "test" / "meta.json").is_file()


def build(name: str, root: str | Path = DEFAULT_ROOT, force: bool = False) -> Path:
    """Build set `name` into root/name unless a cache of this build version is there; return its directory."""
    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(ALL_NAMES)}")
    d = Path(root) / name
    if not force and _cached(d):
        return d
    t0 = time.perf_counter()
    train, test, label_names, info = BUILDERS[name]()
    tmp = d.with_name(f".{name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_xmc(train, tmp / "train.txt")
    write_xmc(test, tmp / "test.txt")
    save_dataset(train, tmp / "train")
    save_dataset(test, tmp / "test")
    if label_names is not None:
        (tmp / "labels.txt").write_text("".join(n.replace("\n", " ") + "\n" for n in label_names))
    meta = {
        "name": name,
        "build_version": BUILD_VERSION,
        "seed": SEED,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "train": train.summary(),
        "test": test.summary(),
        **info,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def load(name: str, root: str | Path = DEFAULT_ROOT) -> tuple[Dataset, Dataset]:
    """(train, test) of set `name`, built and cached under root/name on first use."""
    d = build(name, root)
    return load_dataset(d / "train"), load_dataset(d / "test")


def describe(name: str, root: str | Path = DEFAULT_ROOT) -> dict:
    """Shape of a (built) set: points, features, labels, avg labels and nnz per point, per split."""
    d = build(name, root)
    meta = json.loads((d / "meta.json").read_text())
    train_counts = load_dataset(d / "train").label_counts()
    return {
        "name": name,
        "train_points": meta["train"]["num_points"],
        "test_points": meta["test"]["num_points"],
        "features": meta["train"]["num_features"],
        "labels": meta["train"]["num_labels"],
        "labels_in_train": int((train_counts > 0).sum()),
        "avg_labels_per_point": meta["train"]["avg_labels_per_point"],
        "avg_nnz_per_point": meta["train"]["avg_features_per_point"],
    }


def markdown_table(rows: list[dict]) -> str:
    head = "| set | train points | test points | features | labels (in train) | labels/point | nnz/point |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['train_points']:,} | {r['test_points']:,} | {r['features']:,} | "
            f"{r['labels']:,} ({r['labels_in_train']:,}) | {r['avg_labels_per_point']:.2f} | "
            f"{r['avg_nnz_per_point']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"sets to build (default: {' '.join(NAMES)})")
    ap.add_argument("--large", action="store_true", help=f"also {' '.join(LARGE_NAMES)}")
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="cache directory (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    names = args.names or (NAMES + (LARGE_NAMES if args.large else []))
    rows = []
    for name in names:
        t0 = time.perf_counter()
        try:
            build(name, args.root, force=args.force)
        except DataSourceMissing as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        print(f"{name}: ready in {time.perf_counter() - t0:.1f}s ({Path(args.root) / name})", file=sys.stderr)
        rows.append(describe(name, args.root))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
