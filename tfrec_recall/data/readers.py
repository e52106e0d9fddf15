"""Readers for MovieLens 100K / 1M / latest and generic CSV / Parquet interaction logs.

Every reader returns an :class:`~tfrec_recall.data.schema.InteractionData`. Bad input raises
:class:`~tfrec_recall.data.schema.DataError` naming the file, the 1-based line and the field; with
``on_bad_rows="skip"`` malformed rows are skipped instead, counted in ``InteractionData.skipped_rows`` and
reported through the ``logging`` module. Nothing is dropped silently.
"""
from __future__ import annotations

import codecs
import csv
import io
import logging
import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from tfrec_recall import storage
from tfrec_recall.data.schema import (FEATURE_KINDS, ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, DataError,
                                      InteractionData)

logger = logging.getLogger(__name__)
ON_BAD_ROWS = ("error", "skip")


INT64_MAX = 2 ** 63 - 1


def _int(value: str) -> int:
    out = int(value.strip())
    if not -INT64_MAX - 1 <= out <= INT64_MAX:
        raise ValueError(f"out of the int64 range: {value.strip()!r}")
    return out


def _float(value: str) -> float:
    out = float(value.strip())
    if not math.isfinite(out):
        raise ValueError(f"not a finite number: {value!r}")
    return out


def _str(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("empty value")
    if "\x00" in value:
        raise ValueError(f"contains a NUL byte: {value!r}")
    return value


def _check_options(encoding: str, on_bad_rows: str) -> None:
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}", field="encoding") from None


def read_rows(path, fields: Sequence[Tuple[str, Callable[[str], object]]], *, delimiter: str = ",",
              header: bool = False, encoding: str = "utf-8", on_bad_rows: str = "error",
              select: Optional[Sequence[int]] = None) -> Tuple[Dict[str, list], int]:
    """Parses a delimited text file into columns, validating every field.

    ``fields`` are (name, parser) pairs for the columns in ``select`` (default: the first ``len(fields)``
    columns); a row must have exactly ``expected`` columns (``len(fields)`` or ``max(select)+1`` ... when
    ``select`` is given the row must have at least that many). Returns the columns and the count of rows
    skipped (always 0 when ``on_bad_rows="error"``).
    """
    _check_options(encoding, on_bad_rows)
    path = storage.path_str(path)
    if not storage.isfile(path):
        raise DataError("file not found", path=path)
    select = list(range(len(fields))) if select is None else list(select)
    exact = len(fields) if select == list(range(len(fields))) else None
    columns: Dict[str, list] = {name: [] for name, _ in fields}
    skipped = 0
    multi_char = len(delimiter) > 1

    def bad(message, line, field=None):
        nonlocal skipped
        if on_bad_rows == "skip":
            skipped += 1
            return
        raise DataError(message, path=path, line=line, field=field)

    with storage.open_read(path, encoding) as handle:
        if multi_char:
            lines = ((i + 1, line.rstrip("\r\n").split(delimiter)) for i, line in enumerate(handle))
        else:
            reader = csv.reader(handle, delimiter=delimiter)
            lines = ((reader.line_num, row) for row in reader)
        try:
            for number, row in lines:
                if header and number == 1:
                    continue
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if (exact is not None and len(row) != exact) or len(row) <= max(select):
                    want = exact if exact is not None else f"at least {max(select) + 1}"
                    bad(f"malformed row: expected {want} fields, got {len(row)}", number)
                    continue
                parsed = []
                for (name, parse), index in zip(fields, select):
                    try:
                        parsed.append(parse(row[index]))
                    except (ValueError, TypeError) as error:
                        bad(f"cannot parse {row[index]!r}: {error}", number, name)
                        break
                else:
                    for (name, _), value in zip(fields, parsed):
                        columns[name].append(value)
        except UnicodeDecodeError as error:
            raise DataError(f"cannot decode with encoding {encoding!r}: {error.reason}; pass the file's encoding",
                            path=path, field="encoding") from None
    if skipped:
        logger.warning("%s: skipped %d malformed rows (on_bad_rows='skip')", path, skipped)
    return columns, skipped


def _interactions(columns: Mapping[str, list], weight: Optional[list] = None) -> pd.DataFrame:
    df = pd.DataFrame({
        USER_ID: pd.Series(columns[USER_ID], dtype=object).astype(str),
        ITEM_ID: pd.Series(columns[ITEM_ID], dtype=object).astype(str),
        TIMESTAMP: np.asarray(columns[TIMESTAMP], dtype=np.int64),
    })
    if weight is not None:
        df[WEIGHT] = np.asarray(weight, dtype=np.float64)
    return df


def _decade(year: Optional[int]) -> str:
    return "unknown" if year is None else f"{(year // 10) * 10}s"


def _check_dir(data_dir, needed: Sequence[str]) -> str:
    data_dir = storage.path_str(data_dir)
    for name in needed:
        if not storage.isfile(storage.join(data_dir, name)):
            raise DataError(f"file not found (is {data_dir!r} the right data directory?)",
                            path=storage.join(data_dir, name))
    return data_dir


def read_movielens_100k(data_dir, *, on_bad_rows: str = "error", rating_as_weight: bool = False,
                        encoding: str = "latin-1") -> InteractionData:
    """MovieLens 100K: u.data, u.user, u.item and u.genre. Every rating counts as an interaction."""
    d = _check_dir(data_dir, ["u.data", "u.user", "u.item", "u.genre"])
    cols, skipped = read_rows(storage.join(d, "u.data"), [(USER_ID, _str), (ITEM_ID, _str), ("rating", _float),
                                             (TIMESTAMP, _int)], delimiter="\t", encoding=encoding,
                              on_bad_rows=on_bad_rows)
    genres, _ = read_rows(storage.join(d, "u.genre"), [("name", _str), ("index", _int)], delimiter="|",
                          encoding=encoding, on_bad_rows=on_bad_rows)
    genre_names = [name for name, _ in sorted(zip(genres["name"], genres["index"]), key=lambda t: t[1])]
    users, s2 = read_rows(storage.join(d, "u.user"), [(USER_ID, _str), ("age", _float), ("gender", _str),
                                         ("occupation", _str), ("zip", str)], delimiter="|", encoding=encoding,
                          on_bad_rows=on_bad_rows)
    flag_fields = [(f"g{i}", _int) for i in range(len(genre_names))]
    items, s3 = read_rows(storage.join(d, "u.item"), [(ITEM_ID, _str), ("title", str), ("release", str)] + flag_fields,
                          delimiter="|", encoding=encoding, on_bad_rows=on_bad_rows,
                          select=[0, 1, 2] + list(range(5, 5 + len(genre_names))))
    user_df = pd.DataFrame({
        USER_ID: users[USER_ID], "age": np.asarray(users["age"], dtype=np.float64),
        "gender": users["gender"], "occupation": users["occupation"],
        "zip_region": [z.strip()[:1] if z.strip()[:1].isdigit() else "other" for z in users["zip"]],
    }).set_index(USER_ID)
    item_genres = [tuple(g for g, flag in zip(genre_names, flags) if flag) or ("unknown",)
                   for flags in zip(*[items[f"g{i}"] for i in range(len(genre_names))])]
    years = [int(r[-4:]) if len(r) >= 4 and r[-4:].isdigit() else None for r in items["release"]]
    item_df = pd.DataFrame({ITEM_ID: items[ITEM_ID], "genres": item_genres,
                            "decade": [_decade(y) for y in years]}).set_index(ITEM_ID)
    kinds = {"age": "numeric", "gender": "categorical", "occupation": "categorical", "zip_region": "categorical",
             "genres": "multi_categorical", "decade": "categorical"}
    weight = cols["rating"] if rating_as_weight else None
    titles = pd.Series([t.strip() for t in items["title"]], index=pd.Index(items[ITEM_ID], name=ITEM_ID))
    return InteractionData(_interactions(cols, weight), user_df, item_df, kinds, name="ml-100k",
                           skipped_rows=skipped + s2 + s3, item_titles=titles)


def read_movielens_1m(data_dir, *, on_bad_rows: str = "error", rating_as_weight: bool = False,
                      encoding: str = "latin-1") -> InteractionData:
    """MovieLens 1M: ratings.dat, users.dat and movies.dat (``::``-separated)."""
    d = _check_dir(data_dir, ["ratings.dat", "users.dat", "movies.dat"])
    cols, skipped = read_rows(storage.join(d, "ratings.dat"), [(USER_ID, _str), (ITEM_ID, _str), ("rating", _float),
                                                  (TIMESTAMP, _int)], delimiter="::", encoding=encoding,
                              on_bad_rows=on_bad_rows)
    users, s2 = read_rows(storage.join(d, "users.dat"), [(USER_ID, _str), ("gender", _str), ("age_group", _str),
                                            ("occupation", _str), ("zip", str)], delimiter="::",
                          encoding=encoding, on_bad_rows=on_bad_rows)
    movies, s3 = read_rows(storage.join(d, "movies.dat"), [(ITEM_ID, _str), ("title", str), ("genres", str)],
                           delimiter="::", encoding=encoding, on_bad_rows=on_bad_rows)
    user_df = pd.DataFrame({USER_ID: users[USER_ID], "gender": users["gender"], "age_group": users["age_group"],
                            "occupation": users["occupation"],
                            "zip_region": [z.strip()[:1] or "other" for z in users["zip"]]}).set_index(USER_ID)
    item_df = _movies_frame(movies)
    kinds = {"gender": "categorical", "age_group": "categorical", "occupation": "categorical",
             "zip_region": "categorical", "genres": "multi_categorical", "decade": "categorical"}
    weight = cols["rating"] if rating_as_weight else None
    titles = pd.Series([t.strip() for t in movies["title"]], index=pd.Index(movies[ITEM_ID], name=ITEM_ID))
    return InteractionData(_interactions(cols, weight), user_df, item_df, kinds, name="ml-1m",
                           skipped_rows=skipped + s2 + s3, item_titles=titles)


def _movies_frame(movies: Mapping[str, list]) -> pd.DataFrame:
    years = []
    for title in movies["title"]:
        title = title.strip()
        tail = title[-6:]
        years.append(int(tail[1:5]) if len(tail) == 6 and tail[0] == "(" and tail[1:5].isdigit() else None)
    genres = [tuple(g for g in s.split("|") if g and g != "(no genres listed)") or ("unknown",)
              for s in movies["genres"]]
    return pd.DataFrame({ITEM_ID: movies[ITEM_ID], "genres": genres,
                         "decade": [_decade(y) for y in years]}).set_index(ITEM_ID)


def read_movielens_latest(data_dir, *, on_bad_rows: str = "error", rating_as_weight: bool = False,
                          encoding: str = "utf-8") -> InteractionData:
    """MovieLens latest / latest-small: ratings.csv and movies.csv (with header rows)."""
    d = _check_dir(data_dir, ["ratings.csv", "movies.csv"])
    cols, skipped = read_rows(storage.join(d, "ratings.csv"), [(USER_ID, _str), (ITEM_ID, _str), ("rating", _float),
                                                  (TIMESTAMP, _int)], header=True, encoding=encoding,
                              on_bad_rows=on_bad_rows)
    movies, s2 = read_rows(storage.join(d, "movies.csv"), [(ITEM_ID, _str), ("title", str), ("genres", str)],
                           header=True, encoding=encoding, on_bad_rows=on_bad_rows)
    weight = cols["rating"] if rating_as_weight else None
    return InteractionData(_interactions(cols, weight), None, _movies_frame(movies),
                           {"genres": "multi_categorical", "decade": "categorical"}, name="ml-latest",
                           skipped_rows=skipped + s2)


def _from_table(df: pd.DataFrame, source: str, column_map: Mapping[str, str],
                feature_kinds: Mapping[str, str], user_feature_columns: Sequence[str],
                item_feature_columns: Sequence[str], on_bad_rows: str, multi_value_separator: str,
                header_lines: int) -> InteractionData:
    """Validates a raw table row by row (vectorised) and splits it into interactions and feature tables."""
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    mapping = {USER_ID: USER_ID, ITEM_ID: ITEM_ID, TIMESTAMP: TIMESTAMP}
    unknown = sorted(set(column_map) - {USER_ID, ITEM_ID, TIMESTAMP, WEIGHT})
    if unknown:
        raise DataError(f"column_map names the field {unknown[0]!r}, which is not one of "
                        f"{[USER_ID, ITEM_ID, TIMESTAMP, WEIGHT]}", path=source, field=unknown[0])
    mapping.update(column_map)
    for field, column in mapping.items():
        if column not in df.columns:
            raise DataError(f"missing column {column!r} (mapped to {field!r}); columns are {list(df.columns)}",
                            path=source, field=column)
    for column in list(user_feature_columns) + list(item_feature_columns):
        if column not in df.columns:
            raise DataError(f"missing feature column {column!r}; columns are {list(df.columns)}",
                            path=source, field=column)
        if feature_kinds.get(column) not in FEATURE_KINDS:
            raise DataError(f"feature_kinds[{column!r}] must be one of {FEATURE_KINDS}, "
                            f"got {feature_kinds.get(column)!r}", path=source, field=column)
    bad = np.zeros(len(df), dtype=bool)
    reasons = {}

    def flag(mask, field, message):
        mask = np.asarray(mask) & ~bad
        if mask.any():
            reasons.setdefault(int(np.flatnonzero(mask)[0]), (field, message))
            bad[mask] = True

    for field in (USER_ID, ITEM_ID):
        values = df[mapping[field]]
        flag(values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy(), mapping[field],
             "empty value")
        flag(values.astype(str).str.contains("\x00", regex=False).to_numpy(), mapping[field],
             "the id contains a NUL byte")
    ts = pd.to_numeric(df[mapping[TIMESTAMP]], errors="coerce")
    flag(ts.isna().to_numpy() | (ts.to_numpy() != np.floor(ts.to_numpy())), mapping[TIMESTAMP],
         "timestamp is not an integer")
    flag(np.abs(ts.to_numpy(dtype=float)) >= 2.0 ** 63, mapping[TIMESTAMP], "timestamp is out of the int64 range")
    weight = None
    if WEIGHT in mapping:
        weight = pd.to_numeric(df[mapping[WEIGHT]], errors="coerce")
        flag(~np.isfinite(weight.to_numpy(dtype=float)) | (weight.to_numpy(dtype=float) < 0), mapping[WEIGHT],
             "weight is not a finite non-negative number")
    for column in list(user_feature_columns) + list(item_feature_columns):
        if feature_kinds[column] == "numeric":
            numeric = pd.to_numeric(df[column], errors="coerce")
            flag(~np.isfinite(numeric.to_numpy(dtype=float)), column, "not a finite number")
    if bad.any():
        first = min(reasons)
        field, message = reasons[first]
        if on_bad_rows == "error":
            raw = df.iloc[first][field]
            raise DataError(f"{message}: {raw!r}", path=source, line=first + 1 + header_lines, field=field)
        logger.warning("%s: skipped %d malformed rows (on_bad_rows='skip'); first at line %d (%s: %s)",
                       source, int(bad.sum()), first + 1 + header_lines, field, message)
    keep = ~bad
    clean = df.loc[keep]
    interactions = pd.DataFrame({
        USER_ID: clean[mapping[USER_ID]].astype(str).str.strip().to_numpy(dtype=object),
        ITEM_ID: clean[mapping[ITEM_ID]].astype(str).str.strip().to_numpy(dtype=object),
        TIMESTAMP: ts[keep].to_numpy().astype(np.int64),
    })
    if weight is not None:
        interactions[WEIGHT] = weight[keep].to_numpy(dtype=np.float64)

    def features(key_field, columns):
        if not columns:
            return None
        table = pd.DataFrame({key_field: interactions[key_field].to_numpy()})
        for column in columns:
            values = clean[column]
            kind = feature_kinds[column]
            if kind == "numeric":
                table[column] = pd.to_numeric(values).to_numpy(dtype=np.float64)
            elif kind == "multi_categorical":
                table[column] = [tuple(v.strip() for v in str(s).split(multi_value_separator) if v.strip())
                                 if isinstance(s, str) else tuple(str(v) for v in s) for s in values]
            else:
                table[column] = values.astype(str).to_numpy(dtype=object)
        return table.drop_duplicates(subset=[key_field], keep="last").set_index(key_field)

    return InteractionData(interactions, features(USER_ID, list(user_feature_columns)),
                           features(ITEM_ID, list(item_feature_columns)),
                           {c: feature_kinds[c] for c in list(user_feature_columns) + list(item_feature_columns)},
                           name=source, skipped_rows=int(bad.sum()))


def _refuse_nul(path: str, chunk: int = 1 << 20) -> None:
    """A NUL byte in a text file is corruption (pandas' parser would cut the value there): ``DataError`` naming
    its line."""
    line = 1
    with storage.open_read(path) as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                return
            at = block.find(b"\x00")
            if at >= 0:
                raise DataError("the line contains a NUL byte (a binary or corrupt file?)", path=path,
                                line=line + block.count(b"\n", 0, at))
            line += block.count(b"\n")


def read_csv(path, *, column_map: Optional[Mapping[str, str]] = None, feature_kinds: Optional[Mapping[str, str]] = None,
             user_feature_columns: Sequence[str] = (), item_feature_columns: Sequence[str] = (),
             delimiter: str = ",", encoding: str = "utf-8", on_bad_rows: str = "error",
             multi_value_separator: str = "|") -> InteractionData:
    """A CSV with a header row. ``column_map`` maps schema fields (user_id, item_id, timestamp, weight) to the
    file's column names; feature columns are named with their kinds in ``feature_kinds``."""
    _check_options(encoding, on_bad_rows)
    path = storage.path_str(path)
    if not storage.isfile(path):
        raise DataError("file not found", path=path)
    _refuse_nul(path)
    try:
        with storage.open_read(path) as handle:
            df = pd.read_csv(handle, sep=delimiter, encoding=encoding, dtype=str, keep_default_na=False,
                             na_values=[""], on_bad_lines="error" if on_bad_rows == "error" else "skip",
                             engine="python" if len(delimiter) > 1 else "c")
    except pd.errors.EmptyDataError:
        raise DataError("the file is empty (a CSV needs a header row and rows)", path=path) from None
    except pd.errors.ParserError as error:
        raise DataError(f"malformed row: {error}", path=path) from None
    except UnicodeDecodeError as error:
        raise DataError(f"cannot decode with encoding {encoding!r}: {error.reason}", path=path,
                        field="encoding") from None
    if on_bad_rows == "skip":
        # Rows with the wrong field count were dropped by the parser; count them so nothing vanishes unreported.
        with storage.open_read(path, encoding) as handle:
            rows = sum(1 for row in csv.reader(handle, delimiter=delimiter) if row) - 1
        dropped = rows - len(df)
        if dropped:
            logger.warning("%s: skipped %d rows with the wrong number of fields", path, dropped)
    else:
        dropped = 0
    data = _from_table(df, str(path), column_map or {}, feature_kinds or {}, user_feature_columns,
                       item_feature_columns, on_bad_rows, multi_value_separator, header_lines=1)
    data.skipped_rows += dropped
    return data


PARQUET_MAGIC = b"PAR1"  # the first and the last four bytes of every Parquet file


def _require_parquet_magic(path: str) -> None:
    with storage.open_read(path) as handle:
        head = handle.read(len(PARQUET_MAGIC))
        size = handle.seek(0, io.SEEK_END)
        tail = b""
        if size >= 2 * len(PARQUET_MAGIC):
            handle.seek(size - len(PARQUET_MAGIC))
            tail = handle.read(len(PARQUET_MAGIC))
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise DataError(f"cannot read as Parquet: the file does not start and end with {PARQUET_MAGIC!r} "
                        f"({size} bytes, starts with {head!r})", path=path)


def read_parquet(path, *, column_map: Optional[Mapping[str, str]] = None,
                 feature_kinds: Optional[Mapping[str, str]] = None, user_feature_columns: Sequence[str] = (),
                 item_feature_columns: Sequence[str] = (), on_bad_rows: str = "error",
                 multi_value_separator: str = "|") -> InteractionData:
    """A Parquet file; "line" in errors is the 1-based row number."""
    path = storage.path_str(path)
    if not storage.isfile(path):
        raise DataError("file not found", path=path)
    import pyarrow.parquet as pq
    # pyarrow directly, not pd.read_parquet: after pandas' read of a file that is not Parquet fails, the process
    # aborts at exit ("terminate called without an active exception", pandas 2 / pyarrow 10 here). pyarrow's own
    # failure on such a file did it too, now and then (seen under load): a file without Parquet's magic bytes is
    # refused before pyarrow reads it.
    _require_parquet_magic(path)
    try:
        with storage.open_read(path) as handle:
            df = pq.read_table(handle).to_pandas()
    except (OSError, ValueError) as error:  # pyarrow's errors (ArrowInvalid is a ValueError) lack the file name
        raise DataError(f"cannot read as Parquet: {error}", path=path) from None
    return _from_table(df, str(path), column_map or {}, feature_kinds or {}, user_feature_columns,
                       item_feature_columns, on_bad_rows, multi_value_separator, header_lines=0)
