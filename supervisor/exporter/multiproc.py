"""Reading the workers' prometheus-client multiprocess files, summed over the workers.

Every worker writes its own files into the metrics directory, named by its stable worker
cell id rather than its PID (``counter_<id>.db``, ``gauge_livesum_<id>.db``,
``gauge_livemostrecent_<id>.db``; the directory layout, the ids and the locks that tell
live workers from dead ones are described in :mod:`mtgworkers.stats.prometheus`). A
dead worker's counter file stays and keeps being summed, so counters never go down; the
live gauge files of dead workers are removed before a scrape reads the directory
(:func:`mtgworkers.stats.prometheus.reap_dead_workers`).

:class:`MultiprocReader` adds the values of every file up per sample name and label set:
counters and ``livesum`` gauges are summed, ``livemostrecent`` gauges keep the value
with the newest timestamp. It only reads: it never writes or removes a file.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Final

__all__ = ["LABEL_CACHE_SIZE", "Labels", "MultiprocReader"]

_log = logging.getLogger("mtgworkers.exporter")

# Parsed keys (and, in the exposition, rendered label sets) kept between scrapes.
LABEL_CACHE_SIZE: Final = 100_000

Labels = tuple[tuple[str, str], ...]


class _FileIndex:
    """Where the values of one multiprocess file are: (offset, sample, labels) per key.

    prometheus-client's file is append-only (a new key goes at the end, then the header's
    ``used`` grows), so the index of a file only ever grows while it is the same file."""

    __slots__ = ("entries", "inode", "used")

    def __init__(self, inode: int) -> None:
        self.inode = inode
        self.used = 8  # the header: u32 used + 4 bytes padding
        self.entries: list[tuple[int, str, Labels]] = []


_USED = struct.Struct("<i")
_VALUE = struct.Struct("<dd")


class MultiprocReader:
    """Sums the workers' multiprocess files: counters and ``livesum`` gauges add up,
    ``livemostrecent`` gauges keep the newest value.

    The file format is prometheus-client's (``prometheus_client/mmap_dict.py``: u32 used,
    4 bytes padding, then per key u32 length, the UTF-8 JSON key padded to 8 bytes, f64
    value, f64 timestamp). The position and the parsed key of every value are remembered
    between scrapes, so a scrape reads each file once and unpacks only the numbers: a few
    milliseconds for tens of thousands of values.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._index: dict[str, _FileIndex] = {}
        self._keys: dict[bytes, tuple[str, Labels]] = {}
        self._bad_files: set[str] = set()

    def read(self) -> dict[str, dict[Labels, float]]:
        """Return {sample name: {sorted label pairs: value}} over every file."""
        totals: dict[tuple[str, Labels], float] = {}
        newest: dict[tuple[str, Labels], tuple[float, float]] = {}
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".db"))
        except OSError:
            names = []
        for name in names:
            parts = name[:-3].split("_")
            most_recent = parts[0] == "gauge" and len(parts) == 3 and "mostrecent" in parts[1]
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as stream:
                    inode = os.fstat(stream.fileno()).st_ino
                    data = stream.read()
                index = self._update_index(name, inode, data)
            except FileNotFoundError:  # a dead worker's live gauges, reaped meanwhile
                continue
            except (OSError, ValueError, struct.error) as exc:
                self._index.pop(name, None)
                if path not in self._bad_files:
                    self._bad_files.add(path)
                    _log.error(
                        "cannot read a metrics file", extra={"path": path, "error": str(exc)}
                    )
                continue
            unpack = _VALUE.unpack_from
            if most_recent:
                for offset, sample, labels in index.entries:
                    value, timestamp = unpack(data, offset)
                    key = (sample, labels)
                    if timestamp >= newest.get(key, (-1.0, 0.0))[0]:
                        newest[key] = (timestamp, value)
            else:
                get = totals.get
                for offset, sample, labels in index.entries:
                    key = (sample, labels)
                    totals[key] = get(key, 0.0) + unpack(data, offset)[0]
        for name in set(self._index).difference(names):
            del self._index[name]
        result: dict[str, dict[Labels, float]] = {}
        for (sample, labels), number in totals.items():
            result.setdefault(sample, {})[labels] = number
        for (sample, labels), (_, number) in newest.items():
            result.setdefault(sample, {})[labels] = number
        return result

    def _update_index(self, name: str, inode: int, data: bytes) -> _FileIndex:
        """The index of ``data`` (file ``name``), extended by the keys added since the
        last scrape. Raises ValueError when the file is not in the expected format."""
        if len(data) < 8 or _USED.unpack_from(data, 0)[0] == 0:
            return _FileIndex(inode)  # being created by its worker right now: no values yet
        used = _USED.unpack_from(data, 0)[0]
        if used > len(data):
            raise ValueError(f"header says {used} bytes are used, the file has {len(data)}")
        index = self._index.get(name)
        if index is None or index.inode != inode or used < index.used:
            index = self._index[name] = _FileIndex(inode)
        pos = index.used
        keys = self._keys
        while pos < used:
            length = _USED.unpack_from(data, pos)[0]
            if length <= 0 or pos + 4 + length > used:
                raise ValueError(f"entry at {pos} runs past the used bytes")
            raw = data[pos + 4 : pos + 4 + length]
            pos += 4 + length + (8 - (length + 4) % 8)
            parsed = keys.get(raw)
            if parsed is None:
                if len(keys) > LABEL_CACHE_SIZE:
                    keys.clear()
                parsed = keys[raw] = _parse_key(raw)
            index.entries.append((pos, parsed[0], parsed[1]))
            pos += 16
        if pos != used:
            raise ValueError(f"entries end at {pos}, the header says {used}")
        index.used = used
        return index


def _parse_key(raw: bytes) -> tuple[str, Labels]:
    _metric, sample, labels, _help = json.loads(raw)
    return str(sample), tuple(sorted((str(k), str(v)) for k, v in labels.items()))
