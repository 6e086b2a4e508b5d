"""The curated-record schema: what curation packs into ArrayRecord and the input pipeline reads.

One record = one image with all of its texts. It is serialised with msgpack (no pickle): a map with
short string keys, versioned by ``"v"``. Readers accept every version up to ``SCHEMA_VERSION`` and
reject newer ones with a clear error.

Fields (version 1):

| key | type | meaning |
|---|---|---|
| ``v`` | int | schema version |
| ``uid`` | str | sha224(url)[:24] hex by default, or the pool's own id |
| ``url`` | str | image URL (may be empty for generated pools) |
| ``image`` | bytes | encoded image bytes as given (JPEG/PNG/WebP), empty for URL-only pools |
| ``texts`` | list[str] | all texts of the image (alt, title, ...) |
| ``entry_ids`` | list[list[int]] | matched metadata entry ids per text (sorted, unique) |
| ``keep_prob`` | list[float] | per-text keep probability 1 - prod(1 - p[e]) (1.0 when offline-balanced) |
| ``lang`` | list[str] | per-text language code ("" when unknown) |
"""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack

SCHEMA_VERSION = 1


class RecordError(ValueError):
    """A record that cannot be decoded or violates the schema."""


@dataclasses.dataclass
class Record:
    uid: str
    url: str = ""
    image: bytes = b""
    texts: list[str] = dataclasses.field(default_factory=list)
    entry_ids: list[list[int]] = dataclasses.field(default_factory=list)
    keep_prob: list[float] = dataclasses.field(default_factory=list)
    lang: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if not self.entry_ids:
            self.entry_ids = [[] for _ in range(n)]
        if not self.keep_prob:
            self.keep_prob = [1.0] * n
        if not self.lang:
            self.lang = [""] * n
        for name in ("entry_ids", "keep_prob", "lang"):
            if len(getattr(self, name)) != n:
                raise RecordError(f"record {self.uid!r}: {name} has {len(getattr(self, name))} "
                                  f"items for {n} texts")


def uid_for_url(url: str) -> str:
    """MetaCLIP's uid: sha224 of the URL (tabs and spaces stripped), first 24 hex characters."""
    return hashlib.sha224(url.strip().replace("\t", "").encode("utf-8")).hexdigest()[:24]


def encode(record: Record) -> bytes:
    return msgpack.packb({
        "v": SCHEMA_VERSION,
        "uid": record.uid,
        "url": record.url,
        "image": bytes(record.image),
        "texts": list(record.texts),
        "entry_ids": [[int(i) for i in ids] for ids in record.entry_ids],
        "keep_prob": [float(p) for p in record.keep_prob],
        "lang": list(record.lang),
    }, use_bin_type=True)


def decode(data: bytes) -> Record:
    """Decode one record; raises RecordError on garbage, a newer schema or missing fields."""
    if not data:
        raise RecordError("empty record")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise RecordError(f"undecodable record: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or "v" not in obj:
        raise RecordError("not a metaclip record (no schema version)")
    if obj["v"] > SCHEMA_VERSION:
        raise RecordError(f"record schema v{obj['v']} is newer than this code (v{SCHEMA_VERSION})")
    try:
        return Record(uid=obj["uid"], url=obj.get("url", ""), image=obj.get("image", b""),
                      texts=list(obj["texts"]), entry_ids=[list(x) for x in obj.get("entry_ids", [])],
                      keep_prob=list(obj.get("keep_prob", [])), lang=list(obj.get("lang", [])))
    except KeyError as e:
        raise RecordError(f"record is missing field {e.args[0]!r}") from None
