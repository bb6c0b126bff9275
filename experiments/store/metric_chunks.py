"""The stored form of metric series: a series split into chunk documents, written without duplicates.

Sacred's MongoObserver ``$push``-es a whole series into one ``metrics`` document, which stops
growing at MongoDB's 16 MiB limit. pqa stores a series as chunk documents
``{run_id, name, chunk: k, n, steps, values, timestamps}`` of at most :data:`CHUNK_POINTS`
points; chunk 0 is the document Sacred tools (Omniboard) already read, :func:`read_metric`
joins them all. :class:`ChunkWriter` appends queued points (the observer's and
``pqa db recover``'s one writer): a new chunk is an insert, a partial one a ``$push`` guarded by
the stored count ``n``, so a retry after a lost reply never stores a point twice, and points
that could not be written stay queued for the next try. Small chunks because SecantusDB's
update cost grows with the document (docs/run-store-notes.md).
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import pymongo
import pymongo.errors

CHUNK_POINTS = 5_000

Series = Tuple[list, list, list]  # steps, values, timestamps


def collection_names(collection_prefix: str = "") -> Tuple[str, str]:
    """(runs, metrics) collection names for Sacred's ``collection_prefix``."""
    prefix = f"{collection_prefix}_" if collection_prefix else ""
    return f"{prefix}runs", f"{prefix}metrics"


def ensure_indexes(database, collection_prefix: str = "") -> None:
    """Indexes Sacred never creates; idempotent and cheap when they exist."""
    runs_name, metrics_name = collection_names(collection_prefix)
    database[metrics_name].create_index(
        [("run_id", pymongo.ASCENDING), ("name", pymongo.ASCENDING), ("chunk", pymongo.ASCENDING)],
        unique=True,
        name="pqa_run_id_name_chunk",
    )
    runs = database[runs_name]
    runs.create_index("status", name="pqa_status")
    runs.create_index("start_time", name="pqa_start_time")
    runs.create_index("experiment.name", name="pqa_experiment_name")


def read_metric(database, run_id, name: str, collection_prefix: str = "", with_timestamps: bool = False):
    """The whole series ``(steps, values)`` (plus ``timestamps``) across its chunk documents."""
    fields = {"steps": 1, "values": 1, "chunk": 1, **({"timestamps": 1} if with_timestamps else {})}
    steps, values, stamps = [], [], []
    cursor = database[collection_names(collection_prefix)[1]].find({"run_id": run_id, "name": name}, fields)
    for doc in cursor.sort("chunk", pymongo.ASCENDING):
        steps.extend(doc.get("steps", []))
        values.extend(doc.get("values", []))
        stamps.extend(doc.get("timestamps", []))
    return (steps, values, stamps) if with_timestamps else (steps, values)


def metric_names(database, run_id, collection_prefix: str = "") -> List[str]:
    """The run's series names in the order they were first stored."""
    names: Dict[str, None] = {}
    for doc in database[collection_names(collection_prefix)[1]].find({"run_id": run_id}, {"name": 1}).sort("_id", 1):
        names.setdefault(doc["name"])
    return list(names)


class ChunkError(Exception):
    """A chunk holds a count its writer did not expect (another writer, or a corrupted series)."""


class ChunkWriter:
    """Queues points of one run's series and writes them as chunks; thread-safe.

    ``add`` only queues; ``flush`` writes what it can and returns the first error (the points
    it could not write stay queued). Chunk 0 of each new series is listed in ``info["metrics"]``
    as Sacred does, so Omniboard finds it.
    """

    def __init__(self, collection, run_id):
        self.collection = collection
        self.run_id = run_id
        self._lock = threading.RLock()
        self._pending: Dict[str, Series] = {}
        self._chunks: Dict[str, Tuple[int, int]] = {}  # name -> (chunk, points in it)

    def add(self, name: str, steps, values, stamps) -> None:
        with self._lock:
            queued = self._pending.setdefault(name, ([], [], []))
            for column, items in zip(queued, (steps, values, stamps)):
                column.extend(items)

    def pending(self) -> Dict[str, Series]:
        """A copy of what is queued, by series."""
        with self._lock:
            return {name: tuple(list(c) for c in series) for name, series in self._pending.items()}

    def pending_points(self) -> int:
        with self._lock:
            return sum(len(series[0]) for series in self._pending.values())

    def clear(self) -> None:
        with self._lock:
            self._pending = {}

    def flush(self, info: dict) -> Optional[BaseException]:
        """Write every queued point; returns the first error. One failing series (a value BSON cannot
        encode) does not hold back the others; a store that does not answer stops the flush."""
        first_error = None
        with self._lock:
            for name in list(self._pending):
                steps, values, stamps = self._pending[name]
                while steps:
                    try:
                        chunk, count = self._chunk_state(name)
                        if count >= CHUNK_POINTS:
                            chunk, count = chunk + 1, 0
                        k = min(len(steps), CHUNK_POINTS - count)
                        written = self._push(name, chunk, count, steps[:k], values[:k], stamps[:k], info)
                    except Exception as exc:  # noqa: BLE001 - anything: keep the points, report it
                        first_error = first_error or exc
                        if store_unreachable(exc):
                            return first_error  # don't wait it out once per series
                        break
                    del steps[:written], values[:written], stamps[:written]
                    self._chunks[name] = (chunk, count + written)
                if not steps:
                    del self._pending[name]
        return first_error

    def _chunk_state(self, name: str) -> Tuple[int, int]:
        if name not in self._chunks:
            last = self.collection.find_one(
                {"run_id": self.run_id, "name": name}, {"chunk": 1, "n": 1}, sort=[("chunk", -1)]
            )
            if last is None:
                self._chunks[name] = (0, 0)
            elif "n" not in last:  # a plain Sacred document (overwritten run): start after it
                self._chunks[name] = ((last.get("chunk") or 0) + 1, 0)
            else:
                self._chunks[name] = (last["chunk"], last["n"])
        return self._chunks[name]

    def _push(self, name, chunk, count, steps, values, stamps, info) -> int:
        """Add points to chunk ``chunk``, which must hold ``count``; returns how many landed.

        A retry after a lost reply cannot duplicate points: the insert of a new chunk hits the
        unique index, the guarded update misses, and the stored ``n`` tells how many of the
        queued points are already there.
        """
        key = {"run_id": self.run_id, "name": name, "chunk": chunk}
        if count == 0:
            try:
                result = self.collection.insert_one(
                    {**key, "n": len(steps), "steps": steps, "values": values, "timestamps": stamps}
                )
                if chunk == 0:
                    info.setdefault("metrics", []).append({"name": name, "id": str(result.inserted_id)})
                return len(steps)
            except pymongo.errors.DuplicateKeyError:
                pass
        else:
            result = self.collection.update_one(
                {**key, "n": count},
                {
                    "$push": {"steps": {"$each": steps}, "values": {"$each": values}, "timestamps": {"$each": stamps}},
                    "$inc": {"n": len(steps)},
                },
            )
            if result.matched_count:
                return len(steps)
        doc = self.collection.find_one(key, {"n": 1})
        stored = doc.get("n") if doc else None
        if stored is None or not count < stored <= count + len(steps):
            self._chunks.pop(name, None)
            raise ChunkError(
                f"metric {name!r} of run {self.run_id}: chunk {chunk} holds {stored} points, expected {count}; "
                "another writer?"
            )
        if chunk == 0 and count == 0 and not any(m.get("name") == name for m in info.get("metrics", [])):
            info.setdefault("metrics", []).append({"name": name, "id": str(doc["_id"])})
        return stored - count


def store_unreachable(exc: BaseException) -> bool:
    """True for errors that mean the store did not answer (in time), not that it refused the data."""
    return isinstance(exc, pymongo.errors.ConnectionFailure) or bool(getattr(exc, "timeout", False))
