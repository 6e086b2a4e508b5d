"""Pool readers: parquet, JSONL, TSV, webdataset tars and CommonCrawl WAT files -> raw rows.

Every reader yields dicts ``{"uid": str, "url": str, "texts": list[str], "image": bytes | None}`` in a
deterministic order (file order), and never raises on bad input: a bad text is dropped and counted in
``stats.dropped_texts[reason]``, a bad row in ``stats.skipped_rows[reason]``, an unreadable or truncated
file in ``stats.files[reason]``. Rows kept so far from a truncated file stay (the cut is deterministic).

uid = ``metaclip_jax.records.uid_for_url(url)`` unless the pool carries its own ids (``uid_field``).
Texts of one row are de-duplicated (first occurrence wins) as in the reference per-URL text dedup.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin

from metaclip_jax.records import uid_for_url

FORMATS = ("parquet", "jsonl", "tsv", "webdataset", "wat")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WAT_TEXT_KEYS = ("alt", "title", "data-image-title")


@dataclasses.dataclass
class SourceConfig:
    """How to read a pool. Field names are configurable for tabular formats."""

    format: str = "auto"  # auto | parquet | jsonl | tsv | webdataset | wat
    url_field: str = "url"
    text_fields: tuple[str, ...] = ("caption",)  # each may hold a string or a list of strings
    uid_field: str = ""  # pool-provided id column; empty = sha224(url)[:24]
    image_field: str = ""  # parquet/jsonl column with image bytes (img2dataset parquet: "jpg")
    tsv_columns: tuple[str, ...] = ("caption", "url")  # CC3M: caption<TAB>url
    tsv_header: bool = False
    max_text_chars: int = 100_000
    min_text_chars: int = 1
    skip_data_urls: bool = True  # WAT: drop inline data: URIs (nothing to download)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SourceConfig:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown source option(s) {unknown}; known: {sorted(names)}")
        for k in ("text_fields", "tsv_columns"):
            if k in d:
                v = d[k]
                d[k] = (v,) if isinstance(v, str) else tuple(v)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text_fields"] = list(self.text_fields)
        d["tsv_columns"] = list(self.tsv_columns)
        return d


@dataclasses.dataclass
class SourceStats:
    rows_seen: int = 0
    rows_ok: int = 0
    texts_ok: int = 0
    skipped_rows: Counter = dataclasses.field(default_factory=Counter)
    dropped_texts: Counter = dataclasses.field(default_factory=Counter)
    files: Counter = dataclasses.field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"rows_seen": self.rows_seen, "rows_ok": self.rows_ok, "texts_ok": self.texts_ok,
                "skipped_rows": dict(sorted(self.skipped_rows.items())),
                "dropped_texts": dict(sorted(self.dropped_texts.items())),
                "files": dict(sorted(self.files.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceStats:
        return cls(d.get("rows_seen", 0), d.get("rows_ok", 0), d.get("texts_ok", 0),
                   Counter(d.get("skipped_rows", {})), Counter(d.get("dropped_texts", {})),
                   Counter(d.get("files", {})))

    def merge(self, other: SourceStats) -> None:
        self.rows_seen += other.rows_seen
        self.rows_ok += other.rows_ok
        self.texts_ok += other.texts_ok
        self.skipped_rows.update(other.skipped_rows)
        self.dropped_texts.update(other.dropped_texts)
        self.files.update(other.files)

    @property
    def errors(self) -> int:
        """Row-level errors plus unreadable/truncated files (what max_error_rate is measured on)."""
        return sum(self.skipped_rows.values()) + sum(self.files.values())

    @property
    def error_rate(self) -> float:
        denom = self.rows_seen + sum(self.files.values())
        return self.errors / denom if denom else 0.0


def detect_format(path: str) -> str:
    name = os.path.basename(path).lower()
    for suf in (".gz", ".zst"):
        if name.endswith(suf) and not name.endswith(".tar.gz"):
            name = name[: -len(suf)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".tsv", ".txt")):
        return "tsv"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".wat") or ".wat." in name:
        return "wat"
    raise ValueError(f"cannot tell the format of {path!r} from its name; set source.format")


# ----------------------------------------------------------------------------------------------------------
# Shared validation


def _clean_texts(raw: list[Any], cfg: SourceConfig, stats: SourceStats) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for t in raw:
        if t is None:
            stats.dropped_texts["missing_text"] += 1
            continue
        if isinstance(t, (bytes, bytearray, memoryview)):
            try:
                t = bytes(t).decode("utf-8")
            except UnicodeDecodeError:
                stats.dropped_texts["non_utf8"] += 1
                continue
        if not isinstance(t, str):
            stats.dropped_texts["not_a_string"] += 1
            continue
        if len(t.strip()) < cfg.min_text_chars:
            stats.dropped_texts["empty_text"] += 1
            continue
        if len(t) > cfg.max_text_chars:
            stats.dropped_texts["text_too_long"] += 1
            continue
        if t in seen:
            stats.dropped_texts["duplicate_text"] += 1
            continue
        seen.add(t)
        out.append(t)
    return out


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def _to_str(v: Any) -> str | None:
    """Decode a url/uid value; None when missing or not UTF-8."""
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(v, (int, str)):
        return str(v)
    return None


def _make_row(fields: dict[str, Any], cfg: SourceConfig, stats: SourceStats,
              image: bytes | None = None, fallback_uid: str = "") -> dict[str, Any] | None:
    """Validate one row from a tabular source; count and return None when it is unusable."""
    stats.rows_seen += 1
    url_raw = fields.get(cfg.url_field)
    url = _to_str(url_raw)
    if url_raw is not None and url is None:
        stats.skipped_rows["non_utf8"] += 1
        return None
    url = (url or "").strip()
    uid = ""
    if cfg.uid_field:
        uid = _to_str(fields.get(cfg.uid_field)) or ""
    if not uid:
        if url:
            uid = uid_for_url(url)
        elif fallback_uid:
            uid = fallback_uid
        else:
            stats.skipped_rows["missing_url"] += 1
            return None
    raw_texts: list[Any] = []
    present = False
    for f in cfg.text_fields:
        if f in fields:
            present = True
            raw_texts.extend(_as_list(fields[f]))
    if not present:
        stats.skipped_rows["missing_text"] += 1
        return None
    texts = _clean_texts(raw_texts, cfg, stats)
    if not texts:
        stats.skipped_rows["no_valid_text"] += 1
        return None
    stats.rows_ok += 1
    stats.texts_ok += len(texts)
    return {"uid": uid, "url": url, "texts": texts, "image": image}


# ----------------------------------------------------------------------------------------------------------
# Readers


def open_maybe_gzip(path: str) -> io.BufferedIOBase:
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)  # multi-member gzip (WAT) is handled
    return f


def read_parquet(path: str, cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
    except Exception:
        stats.files["unreadable_file"] += 1
        return
    want = [c for c in (cfg.url_field, *cfg.text_fields, cfg.uid_field, cfg.image_field) if c and c in names]
    if cfg.url_field not in names and not cfg.uid_field:
        stats.files["missing_column"] += 1
        return
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=want):
            cols: dict[str, list[Any]] = {}
            for name in want:
                col = batch.column(name)
                # Strings are read as bytes and decoded here so that invalid UTF-8 is counted, not raised.
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    col = col.cast(pa.binary())
                elif pa.types.is_list(col.type) and pa.types.is_string(col.type.value_type):
                    col = col.cast(pa.list_(pa.binary()))
                cols[name] = col.to_pylist()
            for i in range(batch.num_rows):
                fields = {k: v[i] for k, v in cols.items() if v[i] is not None}
                img = fields.pop(cfg.image_field, None) if cfg.image_field else None
                row = _make_row(fields, cfg, stats, image=bytes(img) if img else None)
                if row is not None:
                    yield row
    except Exception:
        stats.files["truncated_file"] += 1


def _iter_lines(path: str, stats: SourceStats) -> Iterator[bytes]:
    try:
        f = open_maybe_gzip(path)
    except OSError:
        stats.files["unreadable_file"] += 1
        return
    try:
        with f:
            yield from f
    except (OSError, EOFError, zlib.error):
        stats.files["truncated_file"] += 1


_SKIPPED = object()


def _json_line(line: bytes, stats: SourceStats) -> Any:
    """One JSON value, or ``_SKIPPED`` after counting the line as a skipped row (non-UTF-8 or not JSON)."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        reason = "non_utf8"
    except ValueError:
        reason = "bad_json"
    stats.rows_seen += 1
    stats.skipped_rows[reason] += 1
    return _SKIPPED


def read_jsonl(path: str, cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    for line in _iter_lines(path, stats):
        if not line.strip():
            continue
        obj = _json_line(line, stats)
        if obj is _SKIPPED:
            continue
        if not isinstance(obj, dict):
            stats.rows_seen += 1
            stats.skipped_rows["bad_json"] += 1
            continue
        img = None
        if cfg.image_field and isinstance(obj.get(cfg.image_field), str):
            import base64

            try:
                img = base64.b64decode(obj.pop(cfg.image_field), validate=True)
            except ValueError:
                img = None
        row = _make_row(obj, cfg, stats, image=img)
        if row is not None:
            yield row


def read_tsv(path: str, cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    first = True
    for line in _iter_lines(path, stats):
        if first and cfg.tsv_header:
            first = False
            continue
        first = False
        line = line.rstrip(b"\r\n")
        if not line:
            continue
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError:
            stats.rows_seen += 1
            stats.skipped_rows["non_utf8"] += 1
            continue
        parts = s.split("\t")
        if len(parts) != len(cfg.tsv_columns):
            stats.rows_seen += 1
            stats.skipped_rows["wrong_column_count"] += 1
            continue
        row = _make_row(dict(zip(cfg.tsv_columns, parts)), cfg, stats)
        if row is not None:
            yield row


def read_webdataset(path: str, cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    """Tar with members grouped by key: ``key.jpg`` (or png/webp), ``key.json`` (url, caption, ...),
    ``key.txt`` (caption). Members of one key must be adjacent (webdataset order)."""

    def emit(key: str, parts: dict[str, bytes]) -> dict[str, Any] | None:
        fields: dict[str, Any] = {}
        if "json" in parts:
            try:
                obj = json.loads(parts["json"].decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                fields.update(obj)
            except UnicodeDecodeError:
                stats.rows_seen += 1
                stats.skipped_rows["non_utf8"] += 1
                return None
            except ValueError:
                stats.rows_seen += 1
                stats.skipped_rows["bad_json"] += 1
                return None
        texts: list[Any] = []
        for f in cfg.text_fields:
            texts.extend(_as_list(fields.pop(f, None)))
        if "txt" in parts:
            texts.append(parts["txt"])
        fields["__texts__"] = texts
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None:
            stats.rows_seen += 1
            stats.skipped_rows["missing_image"] += 1
            return None
        sub = dataclasses.replace(cfg, text_fields=("__texts__",))
        return _make_row(fields, sub, stats, image=image, fallback_uid=key)

    try:
        for key, parts in iter_tar_samples(path):
            row = emit(key, parts)
            if row is not None:
                yield row
    except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
        # Unreadable from the start, or cut mid-way (rows before the cut are kept; deterministic).
        stats.files["truncated_file" if getattr(e, "_after_first", False) else "unreadable_file"] += 1


def iter_tar_samples(path: str,
                     exts: tuple[str, ...] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of a webdataset tar by key (path up to the first dot of the file name), in tar
    order; only extensions in ``exts`` are read (all when None). Raises on a corrupt tar; errors after
    the first sample carry ``_after_first = True``."""
    started = False
    try:
        with tarfile.open(path, "r:*") as tf:
            key, parts = None, {}
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name[2:] if m.name.startswith("./") else m.name
                base = os.path.basename(name)
                if "." not in base:
                    continue
                k, ext = base.split(".", 1)
                k = os.path.join(os.path.dirname(name), k)
                ext = ext.lower()
                if k != key:
                    if key is not None:
                        started = True
                        yield key, parts
                    key, parts = k, {}
                if exts is None or ext in exts:
                    f = tf.extractfile(m)
                    parts[ext] = f.read() if f is not None else b""
    except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
        e._after_first = started  # type: ignore[union-attr]
        raise
    if key is not None:
        yield key, parts


def _wat_links(obj: Any) -> list[dict[str, Any]]:
    try:
        links = obj["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"]
    except (KeyError, TypeError):
        return []
    return links if isinstance(links, list) else []


def read_wat(path: str, cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    """CommonCrawl WAT (gzip or plain), parsed as the reference ``WATCurator.parse`` (metaclip.md §5.2):
    remember the last ``WARC-Target-URI:``, parse the next line starting with ``{`` as JSON, keep
    ``Links`` whose ``path`` starts with ``IMG@/src`` and that have a ``url``; URL = urljoin(target, url);
    texts from ``alt``, ``title``, ``data-image-title`` (``\\n``/``\\r`` -> space, strip, drop empty).
    Rows with the same uid within one file are merged (unseen texts appended), emitted in first-seen order
    at the end of the file."""
    order: list[str] = []
    merged: dict[str, dict[str, Any]] = {}
    target = ""
    for line in _iter_lines(path, stats):
        if line.startswith(b"WARC-Target-URI:"):
            try:
                target = line[len(b"WARC-Target-URI:"):].decode("utf-8").strip()
            except UnicodeDecodeError:
                target = ""  # relative image URLs of this page stay relative
            continue
        if not line.startswith(b"{"):
            continue
        obj = _json_line(line, stats)
        if obj is _SKIPPED:
            continue
        for link in _wat_links(obj):
            if not isinstance(link, dict) or not str(link.get("path", "")).startswith("IMG@/src"):
                continue
            url = link.get("url")
            stats.rows_seen += 1
            if not isinstance(url, str) or not url.strip():
                stats.skipped_rows["missing_url"] += 1
                continue
            if cfg.skip_data_urls and url.strip().lower().startswith("data:"):
                stats.skipped_rows["data_url"] += 1
                continue
            try:
                url = urljoin(target, url.strip()) if target else url.strip()
            except ValueError:
                stats.skipped_rows["bad_url"] += 1
                continue
            raw = []
            for k in WAT_TEXT_KEYS:
                v = link.get(k)
                if isinstance(v, str):
                    raw.append(v.replace("\n", " ").replace("\r", " ").strip())
            texts = _clean_texts(raw, cfg, stats)
            if not texts:
                stats.skipped_rows["no_valid_text"] += 1
                continue
            uid = uid_for_url(url)
            row = merged.get(uid)
            if row is None:
                merged[uid] = {"uid": uid, "url": url, "texts": texts, "image": None}
                order.append(uid)
                stats.rows_ok += 1
                stats.texts_ok += len(texts)
            else:
                new = [t for t in texts if t not in row["texts"]]
                row["texts"].extend(new)
                stats.texts_ok += len(new)
                stats.dropped_texts["duplicate_text"] += len(texts) - len(new)
    for uid in order:
        yield merged[uid]


READERS = {"parquet": read_parquet, "jsonl": read_jsonl, "tsv": read_tsv,
           "webdataset": read_webdataset, "wat": read_wat}


def read_rows(path: str, cfg: SourceConfig, stats: SourceStats | None = None) -> Iterator[dict[str, Any]]:
    """Yield the valid rows of one pool file, counting bad input in ``stats``."""
    stats = stats if stats is not None else SourceStats()
    fmt = cfg.format if cfg.format != "auto" else detect_format(path)
    if fmt not in READERS:
        raise ValueError(f"unknown source format {fmt!r}; expected one of {FORMATS}")
    if not os.path.exists(path):
        stats.files["missing_file"] += 1
        return iter(())
    return READERS[fmt](path, cfg, stats)
