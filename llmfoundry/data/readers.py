"""Document sources: where the text to convert comes from.

A source is a small frozen dataclass with two methods and a class attribute:

- ``units() -> list[Unit]``: the input cut into slices, in input order (a text file, a 16 MiB byte range of a
  JSON Lines file, a parquet row group, a shard of a HF dataset); a conversion process reads a contiguous
  range of them. The cut depends only on the input, never on the number of processes.
- ``read(unit) -> Iterator[str]``: the documents of one slice, in order.
- ``size_unit``: what ``Unit.size`` counts ('B' for bytes, ' docs', ' shards'), for the progress bar.

Sources: ``TextFiles`` (one document per file: prose, source code), ``JsonFiles`` (JSON Lines or a JSON list of
records, a text field per record, .gz allowed), ``ParquetFiles`` (a text column), ``HFDataset`` (a Hugging Face
dataset by hub name or local path, one split, streaming), ``TextList`` (documents already in memory).
Bad input raises ``DataError`` naming the file and line (or record/row) and the fix.
"""
from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import ClassVar, Iterator, Protocol, Sequence

from llmfoundry.data import DataError

BLOCK_BYTES = 16 << 20  # JSON Lines files are cut into slices of this many bytes
JSON_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXTENSIONS = (".parquet",)


@dataclass(frozen=True)
class Unit:
    """One slice of the input. ``start``/``stop`` mean bytes, a row group, or a shard index by source."""
    path: str
    start: int = 0
    stop: int = -1
    size: int = 1  # work estimate in the source's size_unit (bytes, documents): balances processes, drives progress

    def __str__(self) -> str:
        return self.path if (self.start, self.stop) == (0, -1) else f"{self.path}[{self.start}:{self.stop}]"


class Source(Protocol):
    size_unit: str

    def units(self) -> list[Unit]: ...

    def read(self, unit: Unit) -> Iterator[str]: ...


def iter_documents(source: Source) -> Iterator[str]:
    """All documents of ``source`` in order."""
    for unit in source.units():
        yield from source.read(unit)


# ----------------------------------------------------------------------------------------------- files


def find_files(inputs: Sequence[str], extensions: Sequence[str] | None = None) -> list[str]:
    """Expand files, folders (recursively, hidden entries skipped) and glob patterns into a sorted file list.

    ``extensions`` (e.g. ``['.py', '.txt']``) filters the files found in folders; explicit files and glob
    matches are taken as given. Raises ``DataError`` for an input that matches nothing.
    """
    if not inputs:
        raise DataError("no inputs given: pass files, folders or glob patterns")
    exts = tuple(e if e.startswith(".") else "." + e for e in extensions or ())
    found: list[str] = []
    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in names
                          if not n.startswith(".") and (not exts or n.endswith(exts))]
            if not files:
                what = f"files ending in {', '.join(exts)}" if exts else "files"
                raise DataError(f"folder {path} holds no {what}; pass a folder with input files"
                                + (" or change --extensions" if exts else ""))
            found += sorted(files)
        else:
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"input {item} is not a file or folder, and as a glob pattern it matches no files")
            found += matches
    return list(dict.fromkeys(found))  # drop duplicates, keep order


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode(data: bytes, path: str, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = _line_of(data, e.start)
        raise DataError(f"{path}, line {line}: bytes {data[e.start:e.end]!r} are not valid UTF-8 ({e.reason}); "
                        f"re-encode the file as UTF-8, leave it out, or pass --decode_errors replace") from None


@dataclass(frozen=True)
class TextFiles:
    """One document per file (text, markdown, source code), decoded as UTF-8."""
    paths: tuple[str, ...]
    decode_errors: str = "strict"  # or 'replace'
    size_unit: ClassVar[str] = "B"

    def units(self) -> list[Unit]:
        return [Unit(p, size=max(1, os.path.getsize(p))) for p in self.paths]

    def read(self, unit: Unit) -> Iterator[str]:
        with open(unit.path, "rb") as f:
            data = f.read()
        yield _decode(data, unit.path, self.decode_errors)


def _text_of(record, field: str, where: str) -> str:
    """The text field of one JSON record / dataset row, or a DataError naming ``where`` and the fix."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a '{field}' field, got {type(record).__name__}")
    if field not in record:
        keys = list(record)
        strings = [k for k, v in record.items() if isinstance(v, str)]
        fix = f"pass --text_field {strings[0]}" if len(strings) == 1 else "pass --text_field with the right name"
        raise DataError(f"{where}: no field '{field}' (fields present: {', '.join(keys) or 'none'}); {fix}")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field}' holds {type(text).__name__} {str(text)[:40]!r}, not a string")
    return text


def _json_problem(e: json.JSONDecodeError) -> str:
    """'Expecting value at column 9', 'Invalid control character at column 14' (some of json's messages end
    in 'at' already: "Unterminated string starting at")."""
    at = "" if e.msg.endswith(" at") else " at"
    return f"{e.msg}{at} column {e.colno}"


def _is_json_list(path: str) -> bool:
    """True for a file holding one JSON list; False for JSON Lines (one object per line)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        while chunk := f.read(4096):
            head = chunk.lstrip()
            if head:
                return head.startswith(b"[")
    return False


@dataclass(frozen=True)
class JsonFiles:
    """JSON Lines files (one object per line) or files holding a JSON list of objects; ``.gz`` allowed."""
    paths: tuple[str, ...]
    text_field: str = "text"
    decode_errors: str = "strict"
    block_bytes: int = BLOCK_BYTES
    size_unit: ClassVar[str] = "B"

    def units(self) -> list[Unit]:
        units = []
        for path in self.paths:
            size = os.path.getsize(path)
            if path.endswith(".gz") or _is_json_list(path):
                units.append(Unit(path, size=max(1, size)))
            else:
                units += [Unit(path, a, min(a + self.block_bytes, size), size=min(self.block_bytes, size - a))
                          for a in range(0, size, self.block_bytes)]
        return units

    def read(self, unit: Unit) -> Iterator[str]:
        if unit.stop != -1:  # a byte range of a JSON Lines file
            with open(unit.path, "rb") as f:
                if unit.start:
                    f.seek(unit.start - 1)
                    f.readline()  # a line belongs to the slice where it starts
                yield from self._read_lines(f, unit.path, f.tell(), unit.stop, first_line=None)
        else:
            try:
                if _is_json_list(unit.path):
                    yield from self._read_list(unit.path)
                else:  # gzipped JSON Lines
                    with gzip.open(unit.path, "rb") as f:
                        yield from self._read_lines(f, unit.path, 0, None, first_line=1)
            except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz file
                if not unit.path.endswith(".gz"):
                    raise
                raise DataError(f"{unit.path}: not a readable gzip file ({e}); re-create it or leave it out") from None

    def _read_lines(self, f, path: str, offset: int, stop: int | None, first_line: int | None) -> Iterator[str]:
        start = offset

        def line_number(k: int) -> int:  # only counted when an error is reported
            if first_line is not None:
                return first_line + k
            with open(path, "rb") as g:
                return _line_of(g.read(start), start) + k

        k = 0
        while stop is None or offset < stop:
            raw = f.readline()
            if not raw:
                break
            offset += len(raw)
            k += 1
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8", errors=self.decode_errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {line_number(k - 1)}: bytes {raw[e.start:e.end]!r} are not valid "
                                f"UTF-8 ({e.reason}); re-encode the file as UTF-8 or pass --decode_errors replace"
                                ) from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_number(k - 1)}: not valid JSON ({_json_problem(e)}); "
                                f"each line of a JSON Lines file must hold one JSON object") from None
            yield _text_of(record, self.text_field, f"{path}, line {line_number(k - 1)}")

    def _read_list(self, path: str) -> Iterator[str]:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
        text = _decode(data, path, self.decode_errors)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({_json_problem(e)})") from None
        for i, record in enumerate(records):
            yield _text_of(record, self.text_field, f"{path}, record {i}")


@dataclass(frozen=True)
class ParquetFiles:
    """Parquet files with a string column; one slice per row group."""
    paths: tuple[str, ...]
    text_field: str = "text"
    size_unit: ClassVar[str] = "B"  # uncompressed bytes of the row groups

    def units(self) -> list[Unit]:
        import pyarrow.parquet as pq

        units = []
        for path in self.paths:
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:
                raise DataError(f"{path}: not a readable parquet file ({e})") from None
            names = meta.schema.names
            if self.text_field not in names:
                raise DataError(f"{path}: no column '{self.text_field}' (columns: {', '.join(names)}); "
                                f"pass --text_field with the text column's name")
            units += [Unit(path, g, g + 1, size=max(1, meta.row_group(g).total_byte_size))
                      for g in range(meta.num_row_groups)]
        return units

    def read(self, unit: Unit) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
        for batch in pf.iter_batches(batch_size=4096, row_groups=[unit.start], columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise DataError(f"{unit.path}, row {row}: column '{self.text_field}' holds "
                                    f"{type(text).__name__} {str(text)[:40]!r}, not a string")
                yield text
                row += 1


# ---------------------------------------------------------------------------------------- in memory / hub


@dataclass(frozen=True)
class TextList:
    """Documents already in memory, cut into slices of ``docs_per_unit``."""
    texts: tuple[str, ...]
    docs_per_unit: int = 1024
    size_unit: ClassVar[str] = " docs"

    def units(self) -> list[Unit]:
        n = len(self.texts)
        return [Unit("documents", a, min(a + self.docs_per_unit, n), size=min(self.docs_per_unit, n - a))
                for a in range(0, n, self.docs_per_unit)]

    def read(self, unit: Unit) -> Iterator[str]:
        yield from self.texts[unit.start:unit.stop]


def is_saved_dataset(path: str) -> bool:
    """True for a folder written by ``datasets.Dataset(Dict).save_to_disk``."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


@dataclass(frozen=True)
class HFDataset:
    """One split of a Hugging Face dataset, read in streaming mode; one slice per dataset shard (data file).

    ``path`` is a hub name (``allenai/c4`` with ``name='en'``), a builder with ``data_files`` (``'json'``,
    ``'parquet'``, ``'text'``), a local folder of data files, or a folder written by ``save_to_disk``.
    """
    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    data_files: tuple[str, ...] | None = None
    rows_per_unit: int = 100_000  # slice size for datasets saved with save_to_disk
    size_unit: ClassVar[str] = " shards"

    @property
    def label(self) -> str:
        return f"{self.path}{'/' + self.name if self.name else ''} split '{self.split}'"

    def _open(self):
        import datasets

        local = os.path.expanduser(self.path)
        # local data files checked here: datasets releases differ in what they raise for these, or read nothing
        local_files = [f for f in self.data_files or () if "://" not in f]
        matches = {f: glob.glob(os.path.expanduser(f), recursive=True) for f in local_files}
        missing = [f for f, found in matches.items() if not found]
        if missing:
            raise DataError(f"dataset {self.label} holds no records: --data_files {missing[0]} matches no files; "
                            f"pass files that hold data")
        if local_files and len(local_files) == len(self.data_files) and \
                all(os.path.getsize(m) == 0 for found in matches.values() for m in found if os.path.isfile(m)):
            raise DataError(f"dataset {self.label} holds no records: its data files are empty; pass files that "
                            f"hold data")
        try:
            if os.path.isdir(local) and is_saved_dataset(local):
                ds = datasets.load_from_disk(local)
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise DataError(f"dataset {local} has no split '{self.split}' (splits: {', '.join(ds)}); "
                                        f"pass --splits with existing names")
                    ds = ds[self.split]
                ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), -(-len(ds) // self.rows_per_unit))))
            else:
                data_files = list(self.data_files) if self.data_files else None
                ds = datasets.load_dataset(self.path, self.name, split=self.split, streaming=True,
                                           data_files=data_files)
        except DataError:
            raise
        except StopIteration:  # what datasets raises when the data files hold no record
            raise DataError(f"dataset {self.label} holds no records: its data files are empty; pass files that "
                            f"hold data") from None
        except Exception as e:
            first = _first_line(e)
            if first.startswith("Bad split"):
                raise DataError(f"dataset {self.label}: {first}; pass --splits with existing names") from None
            raise DataError(f"could not open Hugging Face dataset {self.label}: {first}\nPass a hub name (network "
                            f"access needed), a builder such as 'json' with --data_files, or a local folder "
                            f"(data files or one written by save_to_disk)") from e
        features = ds.features
        if features is not None and self.text_field not in features:
            raise DataError(f"dataset {self.label} has no field '{self.text_field}' (fields: "
                            f"{', '.join(features)}); pass --text_field with the text field's name")
        return ds

    def units(self) -> list[Unit]:
        n = _open_hf(self).num_shards
        return [Unit(self.label, i, n) for i in range(n)]

    def read(self, unit: Unit) -> Iterator[str]:
        ds = _open_hf(self)
        if ds.num_shards != unit.stop:
            raise DataError(f"dataset {self.label} changed while converting ({unit.stop} -> {ds.num_shards} shards)")
        shard = ds.shard(num_shards=unit.stop, index=unit.start)
        records, row = iter(shard), 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as e:  # e.g. a data file that is not valid JSON
                files = _shard_files(shard)
                where = f" (file {', '.join(map(str, files[:3]))})" if files else ""
                raise DataError(f"dataset {self.label}, shard {unit.start}{where}, after row {row}: could not read "
                                f"the data ({_first_line(e)}); fix or leave out the bad data file") from None
            yield _text_of(record, self.text_field, f"dataset {self.label}, shard {unit.start}, row {row}")
            row += 1


def _shard_files(shard) -> list[str]:
    """The data files behind one shard of a streamed dataset, where datasets says ([] where it does not):
    ``kwargs['original_files']`` in datasets 2.x-3.x, ``kwargs['files']`` (lists of paths) in 4.x."""
    kwargs = getattr(getattr(shard, "_ex_iterable", None), "kwargs", None) or {}
    files = kwargs.get("original_files") or kwargs.get("files") or []
    out = []
    for f in files:
        out += [f] if isinstance(f, str) else [p for p in f if isinstance(p, str)]
    return out


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@functools.lru_cache(maxsize=8)
def _open_hf(source: HFDataset):
    """Open each dataset once per process (for hub datasets, opening resolves the data files over the network)."""
    return source._open()
