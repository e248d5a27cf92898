"""Write the second toy world's data: a Python source corpus and a number-words task.

    python data/toy2/make.py   (from the repository root; rewrites data/toy2/code and numbers)

- code/train.txt, code/heldout.txt: modules of the CPython 3.11 standard library (PSF licence,
  see code/LICENSE), whole files joined by blank lines; the held-out modules are others than the
  training ones. The retained ability is modelling held-out Python source.
- numbers/train.jsonl, test.jsonl: `{"number": "4512", "words": "four thousand five hundred
  twelve"}` for random integers below a million, train and test disjoint. The downstream task is
  writing a number in English words, a language task the code corpus does not teach.
"""

from __future__ import annotations

import json
import random
import shutil
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent
TRAIN_MODULES = [
    "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py",
    "collections/__init__.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "filecmp.py", "fnmatch.py",
    "functools.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py", "hmac.py",
    "ipaddress.py", "json/decoder.py", "json/encoder.py", "linecache.py",
    "logging/__init__.py", "ntpath.py", "operator.py", "pathlib.py", "pprint.py",
    "queue.py", "random.py", "reprlib.py", "sched.py", "selectors.py", "shlex.py", "shutil.py",
    "string.py", "threading.py", "tokenize.py", "traceback.py", "types.py",
    "uuid.py", "weakref.py", 
]
HELDOUT_MODULES = ["fractions.py", "statistics.py", "textwrap.py", "numbers.py", "graphlib.py"]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """An integer in [0, 10**6) in English words, without "and": 4512 -> four thousand five
    hundred twelve."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + words(n % 100) if n % 100 else "")
    return words(n // 1000) + " thousand" + (" " + words(n % 1000) if n % 1000 else "")


def _corpus(modules: list[str], out: Path) -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out.write_text("\n\n".join((lib / m).read_text().strip() for m in modules) + "\n")


def main() -> None:
    code, numbers = HERE / "code", HERE / "numbers"
    code.mkdir(exist_ok=True)
    numbers.mkdir(exist_ok=True)
    _corpus(TRAIN_MODULES, code / "train.txt")
    _corpus(HELDOUT_MODULES, code / "heldout.txt")
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", code / "LICENSE")
    rng = random.Random(0)
    drawn = rng.sample(range(1, 1_000_000), 8500)
    for name, part in (("train", drawn[:8000]), ("test", drawn[8000:])):
        with open(numbers / f"{name}.jsonl", "w") as f:
            for n in part:
                f.write(json.dumps({"number": str(n), "words": words(n)}) + "\n")


if __name__ == "__main__":
    main()
