"""Write the evaluation data for real pretrained models: word analogies, capitals, held-out prose.

    cd /tmp && pip download --no-deps gensim==4.4.0 -d /tmp/wheels
    cd /tmp && apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb /tmp/jargon
    python data/real/make.py /tmp/wheels/gensim-4.4.0-*.whl /tmp/jargon
                                     (from the repository root; rewrites data/real/*/)

Inputs, both checked against the sha256 below before anything is written:
- word2vec's analogy questions, `questions-words.txt` (Apache-2.0), read from inside the gensim
  4.4.0 wheel (`gensim/test/test_data/questions-words.txt`). Lines "a b c d" under section
  headers ": name".
- The Jargon File 4.4.7 (public domain) as the Debian package jargon-text 4.4.7-4.1 unpacks it:
  `usr/share/doc/jargon-text/jargon.txt.gz` and the package's `copyright` file. The Apache-2.0
  text comes from `/usr/share/common-licenses/Apache-2.0` (Debian's base-files).

Outputs (seed 0; the same inputs give byte-identical files):
- analogies/test.jsonl: 200 four-way multiple-choice analogies, 40 from each semantic section
  (capital-common-countries, capital-world, currency, city-in-state, family), the sections taking
  turns so that the first n items (lm-eval's `limit`) mix them evenly:
  {"section", "a", "b", "c", "choices", "label"}, read "a is to b as c is to choices[label]".
  The three wrong choices are other answers (fourth words) of the same section, never a, b, c,
  the answer, any word the section pairs with c, nor a word `CLOSE` lists for the answer or c
  (mom/mother, krona/krone, Lexington: Massachusetts); questions whose c has two answers in the
  section (Glendale: Arizona and California) are left out.
- capitals/test.jsonl: 100 {"country", "capital"} pairs of distinct countries from the two
  capital sections, leaving out the few whose capital is disputed or renamed (`NOT_ASKED`).
- prose/heldout.jsonl: 150 {"text"} entries of the Jargon File's lexicon, each its headword, a
  blank line and its paragraphs (each paragraph one line, cross-reference braces and
  typographic quotes made plain), 400 to 2,000 characters. Entries with code, tables, quoted
  transcripts (any line not at the body's indent), pronunciations, addresses, URLs or characters
  outside ASCII, the em dash and Latin letters are not drawn.
- prose/replay.jsonl: 400 other entries of the same lexicon (same rules, none of heldout.jsonl's),
  drawn with their own seed (1): the real English text that stands in for a model's pretraining
  data when real text is replayed (`cfs corpus`). Held-out prose is the retained measure, so this
  is the favourable case for real replay: text of the very distribution that is measured.
- analogies/LICENSE, capitals/LICENSE: the Apache-2.0 notice for questions-words.txt and the
  licence text; prose/LICENSE: the Jargon File's public-domain statement from the package.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import unicodedata
import zipfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
QUESTIONS_MEMBER = "gensim/test/test_data/questions-words.txt"
QUESTIONS_SHA256 = "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36"
JARGON_TEXT = "usr/share/doc/jargon-text/jargon.txt.gz"
JARGON_COPYRIGHT = "usr/share/doc/jargon-text/copyright"
JARGON_SHA256 = "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97"
APACHE = Path("/usr/share/common-licenses/Apache-2.0")

SECTIONS = ["capital-common-countries", "capital-world", "currency", "city-in-state", "family"]
PER_SECTION = 40
# Answers too close to each other to be told apart fairly, and states that also have a well-known
# city of c's name: never a wrong choice for one another.
CLOSE_GROUPS = [("mom", "mother"), ("grandma", "grandmother"), ("bride", "wife"),
                ("krona", "krone"), ("rial", "riel"), ("dinar", "denar")]
CLOSE = {w: set(group) - {w} for group in CLOSE_GROUPS for w in group}
CLOSE["Lexington"] = {"Massachusetts"}
CAPITALS = 100
# Countries not asked: not sovereign states, or the file's answer is dated or contested.
NOT_ASKED = {
    "England": "a country of the United Kingdom, not a sovereign state",
    "Greenland": "a territory of Denmark, not a sovereign state",
    "Kazakhstan": "Astana was named Nur-Sultan from 2019 to 2022",
    "Ukraine": "the file spells the capital Kiev; Kyiv is the current English spelling",
}
PROSE_DOCS = 150
PROSE_CHARS = (400, 2000)
REPLAY_DOCS = 400


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checked(data: bytes, expected: str, what: str) -> bytes:
    if _sha256(data) != expected:
        raise SystemExit(f"{what}: sha256 {_sha256(data)}, expected {expected}; another version?")
    return data


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_sections(text: str) -> dict[str, list[list[str]]]:
    """questions-words.txt -> {section: [[a, b, c, d], ...]}, in file order."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
        elif line.strip():
            current.append(line.split())
    return sections


def analogies(sections: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    by_section = []
    for name in SECTIONS:
        items = []
        rows = sections[name]
        pairs = defaultdict(set)  # word -> the words the section pairs it with
        for a, b, c, d in rows:
            pairs[a].add(b)
            pairs[c].add(d)
        answers = sorted({row[3] for row in rows})
        usable = [row for row in rows if len(pairs[row[2]]) == 1]
        for a, b, c, d in rng.sample(usable, PER_SECTION):
            ruled_out = {a, b, c, d} | pairs[c] | CLOSE.get(c, set()) | CLOSE.get(d, set())
            wrong = [w for w in answers if w not in ruled_out]
            choices = rng.sample(wrong, 3)
            label = rng.randrange(4)
            choices.insert(label, d)
            items.append({"section": name, "a": a, "b": b, "c": c, "choices": choices,
                          "label": label})
        by_section.append(items)
    return [item for turn in zip(*by_section) for item in turn]


def capitals(sections: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    capital_of = defaultdict(set)
    for name in ("capital-common-countries", "capital-world"):
        for a, b, c, d in sections[name]:
            capital_of[b].add(a)
            capital_of[d].add(c)
    countries_of = defaultdict(set)
    for country, cities in capital_of.items():
        for city in cities:
            countries_of[city].add(country)
    unique = sorted(country for country, cities in capital_of.items()
                    if len(cities) == 1 and len(countries_of[next(iter(cities))]) == 1
                    and country not in NOT_ASKED)
    return [{"country": c, "capital": next(iter(capital_of[c]))}
            for c in rng.sample(unique, CAPITALS)]


PLAIN = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'",
                       "\xa0": " "})
HEADWORD = re.compile(r"^   :(.+?):(?: |$)")
NOT_PROSE = re.compile(r"@|://|/[^/\s]*['`\u00b4\u00b7][^/]*/")


def _allowed(ch: str) -> bool:
    return (" " <= ch <= "~" or ch == "\u2014"
            or (unicodedata.category(ch).startswith("L") and "LATIN" in unicodedata.name(ch, "")))


def lexicon_entries(text: str) -> list[str]:
    """The Jargon File's lexicon entries as plain text, in file order; entries that are not
    plain prose (see the module docstring) are left out."""
    lines = text.split("\n")
    start = next(i for i, l in enumerate(lines) if HEADWORD.match(l))
    end = next(i for i, l in enumerate(lines) if re.match(r"^Appendix\s+A\.", l))
    entries: list[tuple[str, list[str]]] = []
    for line in lines[start:end]:
        m = HEADWORD.match(line)
        if m:
            entries.append((m.group(1), []))
        else:
            entries[-1][1].append(line)
    docs = []
    for headword, body in entries:
        if any(l.strip() and (not l.startswith("   ") or l.startswith("    ")) for l in body):
            continue
        paragraphs, current = [], []
        for line in body + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        doc = "\n\n".join([headword, *paragraphs]).translate(PLAIN)
        doc = re.sub(r"[{}]", "", doc)
        doc = re.sub(r"[ \t]+", " ", doc)
        if not paragraphs or NOT_PROSE.search(doc) or not all(map(_allowed, doc.replace("\n", ""))):
            continue
        docs.append(doc)
    return docs


def prose(text: str, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """The held-out entries (drawn with `rng`) and the replay entries (the others, seed 1)."""
    lo, hi = PROSE_CHARS
    entries = lexicon_entries(text)
    eligible = [i for i, doc in enumerate(entries) if lo <= len(doc) <= hi]
    heldout = sorted(rng.sample(eligible, PROSE_DOCS))
    rest = [i for i in eligible if i not in set(heldout)]
    replay = sorted(random.Random(1).sample(rest, REPLAY_DOCS))
    return [{"text": entries[i]} for i in heldout], [{"text": entries[i]} for i in replay]


def public_domain_statement(copyright_text: str) -> str:
    """The paragraph of the package's copyright file that states the File's terms."""
    block = copyright_text.split("Copyright:", 1)[1].split("Debian package:", 1)[0]
    return "\n".join(l.strip() for l in block.strip().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gensim_wheel", type=Path, help="gensim-4.4.0-*.whl")
    parser.add_argument("jargon", type=Path, help="folder jargon-text_*.deb was unpacked into")
    args = parser.parse_args()

    with zipfile.ZipFile(args.gensim_wheel) as z:
        questions = _checked(z.read(QUESTIONS_MEMBER), QUESTIONS_SHA256, QUESTIONS_MEMBER)
    jargon = _checked(gzip.decompress((args.jargon / JARGON_TEXT).read_bytes()), JARGON_SHA256,
                      JARGON_TEXT)
    copyright_text = (args.jargon / JARGON_COPYRIGHT).read_text()

    rng = random.Random(0)
    sections = read_sections(questions.decode("utf-8"))
    _write_jsonl(HERE / "analogies" / "test.jsonl", analogies(sections, rng))
    _write_jsonl(HERE / "capitals" / "test.jsonl", capitals(sections, rng))
    heldout, replay = prose(jargon.decode("utf-8"), rng)
    _write_jsonl(HERE / "prose" / "heldout.jsonl", heldout)
    _write_jsonl(HERE / "prose" / "replay.jsonl", replay)

    notice = (
        "analogies/test.jsonl and capitals/test.jsonl are drawn from questions-words.txt, the\n"
        "word-analogy test set of word2vec (Tomas Mikolov et al., Google,\n"
        "https://code.google.com/archive/p/word2vec/), licensed under the Apache License,\n"
        "Version 2.0, as it is distributed in the gensim 4.4.0 wheel\n"
        f"({QUESTIONS_MEMBER},\nsha256 {QUESTIONS_SHA256}).\n"
        "data/real/make.py selected the questions and arranged them as multiple-choice items\n"
        "and question-answer pairs; the words themselves are unchanged.\n\n"
    )
    for folder in ("analogies", "capitals"):
        (HERE / folder / "LICENSE").write_text(notice + "=" * 77 + "\n\n" + APACHE.read_text())
    (HERE / "prose" / "LICENSE").write_text(
        "prose/heldout.jsonl and prose/replay.jsonl hold entries of the Jargon File, version\n"
        "4.4.7 (29 Dec 2003),\n"
        "edited by Eric S. Raymond, as packaged by Debian (jargon-text 4.4.7-4.1,\n"
        f"{JARGON_TEXT},\nsha256 of the unpacked text {JARGON_SHA256}).\n"
        "data/real/make.py selected the entries and made their layout and punctuation plain.\n"
        "The package's copyright file states:\n\n"
        + public_domain_statement(copyright_text) + "\n"
    )


if __name__ == "__main__":
    main()
