"""Held-out text attacks, written here from their papers (TextAttack does not install beside transformers 5).

Each attack is a score-based black box: it sees only the classifier's probabilities on texts it builds.

- **DeepWordBug** (Gao et al. 2018): rank words by how much the true-class probability drops when the word
  is replaced by ``[UNK]`` (Replace-1) or left out, then, in that order, try character edits on each word
  (swap two neighbours, substitute, delete, insert a random letter), keep the edit that lowers the
  true-class probability most, until the label flips or a Levenshtein budget over the text is spent.
- **Pruthi** (Pruthi et al. 2019): typos a person might make — swap two inner neighbours, drop or insert an
  inner character, or substitute a keyboard-adjacent key — on words of at least four letters, first and
  last letter kept; greedy: each round applies the single best typo over all words, up to ``max_words``.
- **PWWS** (Ren et al. 2019): WordNet synonyms (read from Debian's ``wordnet-base`` files), each word's
  best synonym weighted by the softmax of its ``[UNK]`` saliency; words are swapped in that order until the
  label flips.

Robust accuracy counts a text as robust only if it was right before and after the attack (already wrong
texts are "skipped" and count as not robust). Success rate, queries and words changed are over attacked
(originally right) texts; words changed over successful ones.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from latentguard.domains.common import eval_mode
from latentguard.domains.text_cls.model import encode
from latentguard.errors import DataError
from latentguard.registry import TEXT_CLS_ATTACKS

WORDNET_DIR = Path("/usr/share/wordnet")
_WORDNET_HINT = "install Debian's WordNet files (apt-get install wordnet-base) or drop the pwws attack"

# A common English stopword list: these words are never edited (as in the published recipes).
_STOPWORD_TEXT = """
    a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she should
    so some such than that the their theirs them themselves then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves also may might must shall us"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_AFFIXES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


class TextAttackSpec(BaseModel):
    """Base of a held-out text-classification attack: a subclass adds its settings, ``describe`` and
    ``search`` (the word-level search over one text), and registers in ``TEXT_CLS_ATTACKS``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: str
    examples: int = Field(100, gt=0, description="attack the first N test texts: a fixed subset")
    max_queries: int = Field(2000, ge=1, description="model queries per text before giving up")
    batch_size: int = Field(64, ge=1, description="texts per model call")

    def describe(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """Load what the search needs, failing before any text is attacked."""

    def search(self, search: Any, rng: random.Random) -> None:
        """Edit ``search.words`` until ``search.flipped`` or the budget (a ``_Budget`` exception) runs out."""
        raise NotImplementedError


@TEXT_CLS_ATTACKS.register("deepwordbug")
class DeepWordBugSpec(TextAttackSpec):
    kind: Literal["deepwordbug"] = "deepwordbug"
    scoring: Literal["unk", "delete"] = Field("unk", description="Replace-1 with [UNK], or leave-one-out")
    max_edit_distance: int = Field(30, ge=1, description="Levenshtein budget over the whole text")
    candidates_per_edit: int = Field(1, ge=1, le=20, description="random draws per edit kind and word")

    def describe(self) -> str:
        return (
            f"DeepWordBug (latentguard, after Gao et al. 2018): {self.scoring} word ranking, char swap / "
            f"substitute / delete / insert, edit distance ≤ {self.max_edit_distance}, "
            f"≤ {self.max_queries} queries, on {self.examples} test texts"
        )

    def search(self, search: Any, rng: random.Random) -> None:
        _deepwordbug(search, self, rng)


@TEXT_CLS_ATTACKS.register("pruthi")
class PruthiSpec(TextAttackSpec):
    kind: Literal["pruthi"] = "pruthi"
    max_words: int = Field(1, ge=1, description="words that may get a typo")
    min_word_length: int = Field(4, ge=3)
    candidates_per_word: int | None = Field(
        None, ge=1, description="random sample of each word's typos per round (None: all, as published)"
    )

    def describe(self) -> str:
        sample = "" if self.candidates_per_word is None else f", {self.candidates_per_word} typos per word"
        return (
            f"Pruthi typos (latentguard, after Pruthi et al. 2019): swap / drop / insert / keyboard key on "
            f"≤ {self.max_words} word(s){sample}, ≤ {self.max_queries} queries, on {self.examples} test texts"
        )

    def search(self, search: Any, rng: random.Random) -> None:
        _pruthi(search, self, rng)


@TEXT_CLS_ATTACKS.register("pwws")
class PWWSSpec(TextAttackSpec):
    kind: Literal["pwws"] = "pwws"
    wordnet_dir: Path = WORDNET_DIR
    max_words: int | None = Field(None, ge=1, description="words that may be swapped (None: any)")

    def describe(self) -> str:
        cap = "" if self.max_words is None else f", ≤ {self.max_words} words"
        return (
            f"PWWS (latentguard, after Ren et al. 2019): WordNet synonym swaps{cap}, "
            f"≤ {self.max_queries} queries, on {self.examples} test texts"
        )

    def prepare(self) -> None:
        load_wordnet(self.wordnet_dir)

    def search(self, search: Any, rng: random.Random) -> None:
        _pwws(search, self, load_wordnet(self.wordnet_dir))


# -- the model as the attacks see it ----------------------------------------------------------------------
class Victim:
    """Class probabilities of texts, counting every text scored as one query."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, max_length: int, device: torch.device, batch_size: int = 64
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self.batch_size = batch_size
        self.queries = 0
        self.unk = str(tokenizer.unk_token or "[UNK]")

    @torch.no_grad()
    def probs(self, texts: Sequence[str]) -> Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = encode(self.tokenizer, texts[start : start + self.batch_size], self.max_length)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out.append(logits.float().softmax(dim=-1).cpu())
        self.queries += len(texts)
        return torch.cat(out) if out else torch.zeros(0)


@dataclass
class ExampleResult:
    status: Literal["skipped", "success", "failure"]
    original: str
    perturbed: str
    label: int
    queries: int
    words: int
    words_changed: int


@dataclass
class TextAttackOutcome:
    """One attack on one model: accuracy before and after, and the cost statistics TextAttack reports."""

    robust_accuracy: float
    clean_accuracy: float
    success_rate: float | None
    avg_queries: float | None
    avg_words_changed: float | None
    avg_perturbed_word_fraction: float | None
    examples: int
    attacked: int
    successes: int
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- word and character helpers ---------------------------------------------------------------------------
def split_affixes(word: str) -> tuple[str, str, str]:
    """``'"market,'`` → ``('"', 'market', ',')``: edits touch the core only."""
    match = _AFFIXES.match(word)
    assert match is not None
    return match.group(1), match.group(2), match.group(3)


def _editable(word: str, min_length: int) -> bool:
    core = split_affixes(word)[1]
    return len(core) >= min_length and core.isalpha() and core.lower() not in STOPWORDS


def _with_core(word: str, core: str) -> str:
    prefix, _, suffix = split_affixes(word)
    return prefix + core + suffix


def _letter(rng: random.Random, like: str, avoid: str = "") -> str:
    choices = [c for c in string.ascii_lowercase if c != avoid.lower()]
    letter = rng.choice(choices)
    return letter.upper() if like.isupper() else letter


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@functools.lru_cache(maxsize=1)
def keyboard_neighbours() -> dict[str, str]:
    """QWERTY keys next to each letter (same row, and the two touching keys of the rows above / below)."""
    position = {c: (r, i) for r, row in enumerate(_KEYBOARD_ROWS) for i, c in enumerate(row)}
    near: dict[str, str] = {}
    for c, (r, i) in position.items():
        spots = [(r, i - 1), (r, i + 1), (r - 1, i), (r - 1, i + 1), (r + 1, i - 1), (r + 1, i)]
        near[c] = "".join(
            _KEYBOARD_ROWS[rr][ii] for rr, ii in spots if 0 <= rr < 3 and 0 <= ii < len(_KEYBOARD_ROWS[rr])
        )
    return near


def char_edits(core: str, rng: random.Random, per_kind: int) -> list[str]:
    """DeepWordBug's four edits at random positions, ``per_kind`` draws each (distinct, changed words)."""
    out: list[str] = []
    for _ in range(per_kind):
        if len(core) >= 2:
            i = rng.randrange(len(core) - 1)
            out.append(core[:i] + core[i + 1] + core[i] + core[i + 2 :])  # swap neighbours
        i = rng.randrange(len(core))
        out.append(core[:i] + _letter(rng, core[i], core[i]) + core[i + 1 :])  # substitute
        if len(core) >= 2:
            i = rng.randrange(len(core))
            out.append(core[:i] + core[i + 1 :])  # delete
        i = rng.randrange(len(core) + 1)
        out.append(core[:i] + _letter(rng, core[max(i - 1, 0)]) + core[i:])  # insert
    return [w for w in dict.fromkeys(out) if w != core]


def typos(core: str, rng: random.Random) -> list[str]:
    """Pruthi's typos, first and last letter kept: inner swap, inner drop, inner insert, keyboard key."""
    out: list[str] = []
    n = len(core)
    for i in range(1, n - 2):
        out.append(core[:i] + core[i + 1] + core[i] + core[i + 2 :])
    for i in range(1, n - 1):
        out.append(core[:i] + core[i + 1 :])
    for i in range(1, n):
        out.append(core[:i] + _letter(rng, core[i - 1]) + core[i:])
    near = keyboard_neighbours()
    for i in range(1, n - 1):
        for key in near.get(core[i].lower(), ""):
            out.append(core[:i] + (key.upper() if core[i].isupper() else key) + core[i + 1 :])
    return [w for w in dict.fromkeys(out) if w != core]


# -- WordNet, read from its database files ----------------------------------------------------------------
_POS = ("noun", "verb", "adj", "adv")
_MORPHY_RULES = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
             ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}  # fmt: skip


class WordNet:
    """Synonyms from the WordNet 3.0 database files (``index.*``, ``data.*``, ``*.exc``), no NLTK needed.

    Base forms follow WordNet's morphy: the exception lists, then the suffix rules of each part of speech.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        missing = [f"{kind}.{pos}" for pos in _POS for kind in ("index", "data")
                   if not (self.folder / f"{kind}.{pos}").is_file()]  # fmt: skip
        if missing:
            raise DataError(
                f"PWWS needs WordNet: {', '.join(missing)} not found in {self.folder}; {_WORDNET_HINT}"
            )
        self._index: dict[str, dict[str, list[int]]] = {}
        self._data: dict[str, bytes] = {}
        self._exceptions: dict[str, dict[str, list[str]]] = {}

    def _load(self, pos: str) -> None:
        if pos in self._index:
            return
        index: dict[str, list[int]] = {}
        with (self.folder / f"index.{pos}").open(encoding="latin-1") as handle:
            for line in handle:
                if line.startswith(" "):
                    continue  # licence header
                parts = line.split()
                synsets, pointers = int(parts[2]), int(parts[3])
                index[parts[0]] = [int(p) for p in parts[6 + pointers : 6 + pointers + synsets]]
        exceptions: dict[str, list[str]] = {}
        exc_path = self.folder / f"{pos}.exc"
        if exc_path.is_file():
            for line in exc_path.read_text(encoding="latin-1").splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    exceptions[parts[0]] = parts[1:]
        self._index[pos] = index
        self._exceptions[pos] = exceptions
        self._data[pos] = (self.folder / f"data.{pos}").read_bytes()

    def base_forms(self, word: str, pos: str) -> list[str]:
        self._load(pos)
        index = self._index[pos]
        forms = [word, *self._exceptions[pos].get(word, [])]
        forms += [word[: -len(old)] + new for old, new in _MORPHY_RULES[pos] if word.endswith(old)]
        return [f for f in dict.fromkeys(forms) if f in index]

    def _lemmas(self, pos: str, offset: int) -> list[str]:
        data = self._data[pos]
        line = data[offset : data.index(b"\n", offset)].decode("latin-1").split()
        count = int(line[3], 16)
        return [re.sub(r"\(.*\)$", "", line[4 + 2 * k]) for k in range(count)]

    def synonyms(self, word: str) -> list[str]:
        """Single-word synonyms of ``word`` over every part of speech, in WordNet order."""
        lower = word.lower()
        found: list[str] = []
        for pos in _POS:
            for base in self.base_forms(lower, pos):
                for offset in self._index[pos][base]:
                    found += [lemma.lower() for lemma in self._lemmas(pos, offset)]
        return [w for w in dict.fromkeys(found) if w.isalpha() and w != lower]


@functools.lru_cache(maxsize=2)
def load_wordnet(folder: Path) -> WordNet:
    return WordNet(folder)


# -- the searches -----------------------------------------------------------------------------------------
class _Budget(Exception):
    """Raised inside a search when the query budget is spent."""


class _Search:
    """State of one attack on one text: the current words, the true-class probability, the budget."""

    def __init__(self, victim: Victim, words: list[str], label: int, max_queries: int) -> None:
        self.victim = victim
        self.words = list(words)
        self.label = label
        self.start = victim.queries
        self.max_queries = max_queries
        self.true_prob = 1.0
        self.flipped = False

    @property
    def used(self) -> int:
        return self.victim.queries - self.start

    def score(self, candidates: list[list[str]]) -> Tensor:
        """Probabilities of candidate word lists; stops the search when the budget is spent."""
        left = self.max_queries - self.used
        if left <= 0:
            raise _Budget
        return self.victim.probs([" ".join(w) for w in candidates[:left]])

    def accept(self, words: list[str], probs: Tensor) -> None:
        self.words = list(words)
        self.true_prob = float(probs[self.label])
        self.flipped = int(probs.argmax()) != self.label

    def replaced(self, i: int, word: str) -> list[str]:
        return [*self.words[:i], word, *self.words[i + 1 :]]


def _importance(search: _Search, positions: list[int], leave_out: bool) -> Tensor:
    """Drop in true-class probability when each word is replaced by ``[UNK]`` (or left out)."""
    if not positions:
        return torch.zeros(0)
    probes = [
        [*search.words[:i], *search.words[i + 1 :]] if leave_out else search.replaced(i, search.victim.unk)
        for i in positions
    ]
    probs = search.score(probes)
    if len(probs) < len(positions):
        raise _Budget
    return search.true_prob - probs[:, search.label]


def _deepwordbug(search: _Search, spec: DeepWordBugSpec, rng: random.Random) -> None:
    positions = [i for i, w in enumerate(search.words) if _editable(w, 1)]
    ranking = _importance(search, positions, spec.scoring == "delete")
    spent = 0
    for index in ranking.argsort(descending=True, stable=True).tolist():
        i = positions[index]
        core = split_affixes(search.words[i])[1]
        options = [(c, levenshtein(core, c)) for c in char_edits(core, rng, spec.candidates_per_edit)]
        options = [(c, d) for c, d in options if spent + d <= spec.max_edit_distance]
        if not options:
            continue
        probs = search.score([search.replaced(i, _with_core(search.words[i], c)) for c, _ in options])
        best = int(probs[:, search.label].argmin())
        if float(probs[best, search.label]) < search.true_prob:
            search.accept(search.replaced(i, _with_core(search.words[i], options[best][0])), probs[best])
            spent += options[best][1]
            if search.flipped:
                return


def _pruthi(search: _Search, spec: PruthiSpec, rng: random.Random) -> None:
    changed: set[int] = set()
    for _ in range(spec.max_words):
        candidates: list[list[str]] = []
        where: list[int] = []
        for i, word in enumerate(search.words):
            if i in changed or not _editable(word, spec.min_word_length):
                continue
            options = typos(split_affixes(word)[1], rng)
            if spec.candidates_per_word is not None and len(options) > spec.candidates_per_word:
                options = rng.sample(options, spec.candidates_per_word)
            candidates += [search.replaced(i, _with_core(word, o)) for o in options]
            where += [i] * len(options)
        if not candidates:
            return
        probs = search.score(candidates)
        best = int(probs[:, search.label].argmin())
        if float(probs[best, search.label]) >= search.true_prob:
            return
        search.accept(candidates[best], probs[best])
        changed.add(where[best])
        if search.flipped or len(probs) < len(candidates):
            return


def _pwws(search: _Search, spec: PWWSSpec, wordnet: WordNet) -> None:
    positions = [i for i, w in enumerate(search.words) if _editable(w, 2)]
    saliency = _importance(search, positions, leave_out=False)
    weights = saliency.softmax(dim=0) if len(positions) else saliency
    scored: list[tuple[float, int, str]] = []
    for k, i in enumerate(positions):
        word = search.words[i]
        core = split_affixes(word)[1]
        options = [s.capitalize() if core[:1].isupper() else s for s in wordnet.synonyms(core)]
        if not options:
            continue
        probs = search.score([search.replaced(i, _with_core(word, o)) for o in options])
        best = int(probs[:, search.label].argmin())
        gain = search.true_prob - float(probs[best, search.label])
        scored.append((float(weights[k]) * gain, i, _with_core(word, options[best])))
    scored.sort(key=lambda item: -item[0])
    for _, i, replacement in scored[: spec.max_words]:
        words = search.replaced(i, replacement)
        probs = search.score([words])
        search.accept(words, probs[0])
        if search.flipped:
            return


def attack_text(
    victim: Victim, text: str, label: int, spec: TextAttackSpec, rng: random.Random
) -> ExampleResult:
    """Attack one text; ``rng`` draws the random characters, so the result is reproducible."""
    words = text.split()
    search = _Search(victim, words, label, spec.max_queries)
    probs = victim.probs([" ".join(words)])[0]
    search.accept(words, probs)
    if search.flipped:
        return ExampleResult("skipped", text, text, label, search.used, len(words), 0)
    with contextlib.suppress(_Budget):  # the query budget ran out: the search ends where it stands
        spec.search(search, rng)
    changed = sum(a != b for a, b in zip(words, search.words, strict=True))
    status: Literal["success", "failure"] = "success" if search.flipped else "failure"
    return ExampleResult(status, text, " ".join(search.words), label, search.used, len(words), changed)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(results: list[ExampleResult], seconds: float, samples: int = 3) -> TextAttackOutcome:
    attacked = [r for r in results if r.status != "skipped"]
    successes = [r for r in attacked if r.status == "success"]
    n = max(len(results), 1)
    return TextAttackOutcome(
        robust_accuracy=sum(r.status == "failure" for r in results) / n,
        clean_accuracy=len(attacked) / n,
        success_rate=len(successes) / len(attacked) if attacked else None,
        avg_queries=_mean([r.queries for r in attacked]),
        avg_words_changed=_mean([r.words_changed for r in successes]),
        avg_perturbed_word_fraction=_mean([r.words_changed / max(r.words, 1) for r in successes]),
        examples=len(results),
        attacked=len(attacked),
        successes=len(successes),
        seconds=seconds,
        samples=[
            {"original": r.original, "perturbed": r.perturbed, "label": r.label} for r in successes[:samples]
        ],
    )


def run_attack(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    spec: TextAttackSpec,
    *,
    max_length: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> TextAttackOutcome:
    """Attack the first ``spec.examples`` texts with ``spec``; the model's mode is restored afterwards."""
    spec.prepare()  # e.g. PWWS fails here, before any work, when WordNet is missing
    count = min(spec.examples, len(texts))
    if count == 0:
        raise ValueError(f"attack {spec.name!r}: no test texts to attack")
    victim = Victim(model, tokenizer, max_length, torch.device(device), spec.batch_size)
    start = time.perf_counter()
    results = []
    with eval_mode(model):
        for k in range(count):
            rng = random.Random(f"{seed}:{spec.name}:{k}")
            results.append(attack_text(victim, texts[k], int(labels[k]), spec, rng))
            if progress is not None:
                progress(k + 1)
    return summarise(results, time.perf_counter() - start)
