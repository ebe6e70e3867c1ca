"""Reading text corpora (files, directories, globs, the built-in corpus).

Everything here is about files on disk. Every problem with them is a `DataError` that names the
file (and line) and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pathlib
import sysconfig

from absl import logging

from minids_jax.errors import UserError


class DataError(UserError, ValueError):
    """A data file is missing, empty or malformed; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    name: str  # for messages, e.g. "data.path='books/*.txt'"
    documents: list[str]  # one per file; EOS separates them in the token stream
    digest: str  # sha256 of the documents' content: keys the caches


def content_digest(documents: list[str]) -> str:
    sha = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8")
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()


def builtin_corpus_files() -> list[pathlib.Path]:
    """The running interpreter's standard-library sources, in a fixed (sorted) order."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def text_files(path: str) -> list[pathlib.Path]:
    """A file, every non-hidden file under a directory, or the matches of a glob; sorted."""
    if any(ch in path for ch in "*?["):
        matches = [pathlib.Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True)]
    else:
        matches = [pathlib.Path(path).expanduser()]
        if not matches[0].exists():
            raise DataError(f"data.path={path!r} does not exist; point it at a text file, a "
                            f"directory of text files, or a glob such as 'corpus/**/*.txt'.")
    files = []
    for match in matches:
        if match.is_dir():
            files += [p for p in match.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(match).parts)]
        elif match.is_file():
            files.append(match)
    if not files:
        raise DataError(f"data.path={path!r} matches no files; point it at a text file, a "
                        f"directory of text files, or a glob such as 'corpus/**/*.txt'.")
    return sorted(files)


def _decode(data: bytes, cut: bool) -> str | None:
    """The text of a UTF-8 file, or None for a binary or otherwise encoded one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        if not (cut and error.start >= len(data) - 3):  # a character cut by max_bytes is fine
            return None
        text = data[:error.start].decode("utf-8", errors="replace")
    return None if "\0" in text else text


def read_text_corpus(files: list[pathlib.Path], name: str, max_bytes: int = 0,
                     expect_skips: bool = False) -> TextCorpus:
    """Decodes each file as UTF-8; skips (and counts) binary or non-UTF-8 files and empty ones."""
    documents, not_text, empty, total = [], [], 0, 0
    for path in files:
        data = path.read_bytes()
        cut = bool(max_bytes) and len(data) > max_bytes - total
        if cut:
            data = data[:max_bytes - total]
        text = _decode(data, cut)
        if text is None:
            not_text.append(path)
            continue
        if not text:
            empty += 1
            continue
        documents.append(text)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    if not_text:
        logging.log(logging.INFO if expect_skips else logging.WARNING,
                    "%s: skipped %d file(s) that are not UTF-8 text, e.g. %s",
                    name, len(not_text), ", ".join(str(p) for p in not_text[:3]))
    if not documents:
        if not_text:
            raise DataError(
                f"{name} holds no text files: all {len(not_text)} file(s) it matches are binary "
                f"or not UTF-8 (e.g. {not_text[0]}); point data.path at UTF-8 text or convert it "
                f"(e.g. `iconv -f latin1 -t utf-8`).")
        raise DataError(f"the corpus {name} is empty ({len(files)} file(s), 0 bytes of text); "
                        f"add text to it or point data.path at another corpus.")
    logging.info("%s: %d document(s), %.1f MB of text", name, len(documents), total / 1e6)
    return TextCorpus(name, documents, content_digest(documents))
