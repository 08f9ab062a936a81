"""Text: `tsv:`, `csv:` and `jsonl:` sources, and how a text travels as a tensor.

    tsv:DIR     DIR/train.tsv and DIR/test.tsv (any other file in DIR is ignored)
    tsv:FILE    one file; `tl prepare` holds out --test-fraction of it, stratified
    csv:...     the same with commas; jsonl:... one JSON object a line

Columns are `text` (or `sentence`, as GLUE writes it) and `label`; `--text-column` and
`--label-column` name others. A file without a header row takes `--no-header`: then columns are
numbered from 0 and text is column 0, label column 1 unless the options say otherwise. Labels
may be words (`World`, `Sports`) or numbers; the classes are their sorted distinct values.

A prepared text dataset keeps each text as its UTF-8 bytes, whole, in the shards' `image`
column (stored "text"), not as token ids: the same prepared dataset then serves every model
(each tokenises as it was trained to: the MiniLM encoder's WordPiece, the byte-level text CNN)
and the TF-IDF baseline, which needs the words themselves. Readers hand a text to a model as a
row of bytes, zero-padded to the longest training text (at most MAX_TEXT_BYTES): uint8
N x 1 x 1 x L, the shape every loader, shard reader and checkpoint already carries; the model's
first block turns the bytes into tokens (`tl_core.models.text`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from tl_core import storage
from tl_core.errors import UserError

TEXT_SCHEMES = ("tsv", "csv", "jsonl")
SUFFIXES = {"tsv": (".tsv", ".txt"), "csv": (".csv",), "jsonl": (".jsonl", ".json")}
TEXT_COLUMNS = ("text", "sentence")  # the default text column: the first of these a file has
MAX_TEXT_BYTES = 2048  # a text is cut here when read for a model (MiniLM reads 128 tokens, ~600 bytes)
MAX_LINE_BYTES = 1 << 20  # a longer line is a broken file (a missing quote or newline), not a text
CHUNK = 4096  # texts per chunk handed to the shard writer


def is_text_uri(uri: str) -> bool:
    return uri.partition(":")[0] in TEXT_SCHEMES and ":" in uri


def _records(path: Path, scheme: str, header: bool) -> tuple[list[str] | None, list[list[str]] | list[dict]]:
    """(column names or None, rows) of one file, every problem named with its line."""
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{path} is empty: give it a header row and one text a line")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    lines = content.splitlines()
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_BYTES:
            raise UserError(f"{path}, line {number}: {len(line)} characters, more than {MAX_LINE_BYTES} in one line; "
                            "a quote or a line break is probably missing there: fix the file")
    if scheme == "jsonl":
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise UserError(f"{path}, line {number}: not a JSON object ({err}); one object a line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object with text and label")
            rows.append(row)
        return None, rows
    reader = csv.reader(io.StringIO(content), delimiter="\t" if scheme == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if scheme == "tsv" else csv.QUOTE_MINIMAL)
    try:
        rows = [row for row in reader if row]
    except csv.Error as err:
        raise UserError(f"{path}, line {reader.line_num}: {err}; fix the file's quoting") from None
    if header:
        return [c.strip() for c in rows[0]], rows[1:]
    return None, rows


def _column(names: list[str] | None, wanted: str | None, default: tuple[str, ...], what: str, path: Path,
            fallback: int) -> int | str:
    """Where a column is: its position in a delimited file's row, or its key in a JSON object."""
    if names is None:  # no header (or JSON): positions or keys as given
        if wanted is None:
            return fallback
        return int(wanted) if wanted.isdigit() else wanted
    candidates = [wanted] if wanted is not None else list(default)
    for name in candidates:
        if name in names:
            return names.index(name)
    hint = "--no-header (text in column 0, label in column 1)" if what == "text" and wanted is None else f"--{what}-column"
    raise UserError(f"{path} has no {' or '.join(repr(c) for c in candidates)} column (its first row is "
                    f"{[n[:30] for n in names[:6]]}): name the {what} column with --{what}-column, or if the file has no header row, "
                    f"pass {hint}")


def read_text_file(path: Path, scheme: str, text_column: str | None, label_column: str | None,
                   header: bool) -> tuple[list[str], list[str]]:
    """(texts, label strings) of one file."""
    names, rows = _records(path, scheme, header and scheme != "jsonl")
    if scheme == "jsonl":
        names_seen = sorted({k for row in rows[:100] for k in row})
        text_key = text_column or next((c for c in TEXT_COLUMNS if any(c in row for row in rows[:100])), None)
        label_key = label_column or "label"
        if text_key is None or not all(text_key in row for row in rows) or not all(label_key in row for row in rows):
            raise UserError(f"{path}: every line needs a {text_key or 'text'!r} and a {label_key!r} key (keys seen: "
                            f"{names_seen}); name others with --text-column / --label-column")
        texts, labels = [row[text_key] for row in rows], [row[label_key] for row in rows]
    else:
        text_at = _column(names, text_column, TEXT_COLUMNS, "text", path, 0)
        label_at = _column(names, label_column, ("label",), "label", path, 1)
        if not isinstance(text_at, int) or not isinstance(label_at, int):
            raise UserError(f"{path}: without a header, --text-column and --label-column are column numbers from 0")
        need = max(text_at, label_at) + 1
        short = next((i for i, row in enumerate(rows) if len(row) < need), None)
        if short is not None:
            raise UserError(f"{path}, row {short + 1 + bool(names)}: {len(rows[short])} column(s), but the text and "
                            f"label are in columns {text_at} and {label_at}: fix that row or the column options")
        texts, labels = [row[text_at] for row in rows], [row[label_at] for row in rows]
    if not texts:
        raise UserError(f"{path} has a header but no texts: add one text a line")
    for number, (text, label) in enumerate(zip(texts, labels), 1):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}, text {number}: empty or not a string ({text!r}); remove the row or fill it in")
        if isinstance(label, (dict, list)) or label is None or str(label).strip() == "":
            raise UserError(f"{path}, text {number}: label {label!r} is not a class name or number; fix it")
    return [t.strip() for t in texts], [str(label).strip() for label in labels]


def text_files(location: str, scheme: str) -> dict[str, Path]:
    """{split: file}: DIR/train.* and DIR/test.*, or one file as the train split."""
    path = Path(location)
    if storage.is_s3(location):
        raise UserError(f"{scheme}:{location}: text sources are read from a local path; copy the files down first")
    if path.is_file():
        return {"train": path}
    if not path.is_dir():
        raise UserError(f"{scheme}:{location} does not exist: give a {scheme.upper()} file, or a folder with "
                        f"train{SUFFIXES[scheme][0]} and test{SUFFIXES[scheme][0]}")
    found = {}
    for split in ("train", "test"):
        for suffix in SUFFIXES[scheme]:
            if (path / f"{split}{suffix}").is_file():
                found[split] = path / f"{split}{suffix}"
                break
    if "train" not in found:
        raise UserError(f"{scheme}:{location} has no train{SUFFIXES[scheme][0]}: a text folder holds "
                        f"train{SUFFIXES[scheme][0]} (and test{SUFFIXES[scheme][0]}), or point at one file")
    return found


def class_order(labels: list[str]) -> list[str]:
    """The classes: sorted distinct labels, numerically where they are all whole numbers."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def open_text(uri: str, text_column: str | None, label_column: str | None, header: bool):
    """The `Source` (see tl_core.data.sources) of a text URI: texts kept as UTF-8 bytes."""
    from tl_core.data.sources import Source

    scheme, _, location = uri.partition(":")
    files = text_files(location, scheme)
    read = {split: read_text_file(path, scheme, text_column, label_column, header) for split, path in files.items()}
    classes = class_order(read["train"][1])
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, labels in read.values() for label in labels} - set(index))
    if unknown:
        raise UserError(f"{files['test']}: label(s) {unknown[:5]} never occur in {files['train']}: a class needs "
                        "training texts; fix the labels or drop those rows")
    texts = {split: [t.encode("utf-8") for t in texts] for split, (texts, _) in read.items()}
    labels = {split: np.array([index[label] for label in labels], dtype=np.int64) for split, (_, labels) in read.items()}
    digest = storage.sha256_bytes(b"".join(storage.sha256_bytes(path.read_bytes()).encode() for path in files.values())
                                  + json.dumps([text_column, label_column, header]).encode())

    def chunks(split: str, rows: np.ndarray):
        for start in range(0, len(rows), CHUNK):
            yield [texts[split][i] for i in rows[start : start + CHUNK]]

    longest = max(len(t) for t in texts["train"])
    return Source(classes, labels, chunks, "text", digest, {"train": (1, 1, min(longest, MAX_TEXT_BYTES))})


def bytes_rows(texts: list[bytes], width: int) -> np.ndarray:
    """Texts as uint8 N x 1 x 1 x width: UTF-8 bytes, cut at `width`, zero-padded."""
    out = np.zeros((len(texts), 1, 1, width), dtype=np.uint8)
    for i, text in enumerate(texts):
        cut = text[:width]
        out[i, 0, 0, : len(cut)] = np.frombuffer(cut, dtype=np.uint8)
    return out


def strings_of(x: torch.Tensor | np.ndarray) -> list[str]:
    """The texts of a batch of byte rows (N x 1 x 1 x L, zero-padded), as strings."""
    rows = (x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).reshape(len(x), -1)
    # A cut may fall inside a character: its broken tail is dropped ("ignore").
    return [row.tobytes().rstrip(b"\0").decode("utf-8", errors="ignore") for row in rows]


def to_byte_rows(texts: list[str], width: int) -> torch.Tensor:
    """Raw strings (a pyfunc's input) as the byte rows a text model takes."""
    return torch.from_numpy(bytes_rows([t.encode("utf-8") for t in texts], width))
