"""Snapshot layout (docs/FORMAT.md): plan a layout, finish a header, read and validate a buffer."""
from __future__ import annotations

import hmac
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import SnapshotError
from ..secret import Purpose, current as job_secret

MAGIC = b"FFSNAP\x00\x01"
VERSION = 2  # 2: HMAC-SHA256 in the prefix, JSON meta (1: unauthenticated, pickled meta)
ALIGN = 64
# 64 bytes of fields, then the 32-byte HMAC and 32 reserved zero bytes: the manifest stays 64-aligned.
PREFIX = struct.Struct("<8sIIQQQQIIII32s32x")
assert PREFIX.size == 128
_CRC_OFFSET = 12
_MAC_OFFSET = 64
_MAC_LEN = 32
# Segments this small are authenticated byte for byte (besides `meta`, whatever its size): RNG states,
# counters, small buffers cost microseconds; the big tensors are covered through their FF31 sums.
FULL_MAC_MAX_BYTES = 64 << 10

_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in _DTYPES.items()}


def round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise SnapshotError(f"snapshot: unsupported tensor dtype {dtype}")
    return _NAMES[dtype]


@dataclass
class SegmentInfo:
    """One payload segment: a tensor (or the `meta` JSON), at `offset` from the payload start."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int
    checksum: int = 0

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "nbytes": self.nbytes, "checksum": f"{self.checksum:016x}"}


@dataclass
class Layout:
    """Where every segment goes; known before packing, so packing can start right away."""

    segments: List[SegmentInfo]
    fingerprint: str
    dtype_config: str
    manifest_len: int
    payload_off: int
    total_bytes: int

    def manifest_bytes(self) -> bytes:
        doc = {"segments": [s.to_json() for s in self.segments], "fingerprint": self.fingerprint,
               "dtype_config": self.dtype_config}
        return json.dumps(doc, separators=(",", ":")).encode()


def plan_layout(tensors: Sequence[Tuple[str, torch.Tensor]], fingerprint: str, dtype_config: str) -> Layout:
    """Assign 64-byte aligned payload offsets to named tensors (checksums filled in later)."""
    segs, off = [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        segs.append(SegmentInfo(name, dtype_name(t.dtype), tuple(t.shape), off, nbytes))
        off = round_up(off + nbytes)
    payload_len = segs[-1].offset + segs[-1].nbytes if segs else 0
    layout = Layout(segs, fingerprint, dtype_config, 0, 0, 0)
    layout.manifest_len = len(layout.manifest_bytes())  # fixed-width checksums: length is final
    layout.payload_off = PREFIX.size + round_up(layout.manifest_len)
    layout.total_bytes = layout.payload_off + payload_len
    return layout


def _zeroed(prefix: bytes, offset: int, length: int) -> bytes:
    return prefix[:offset] + bytes(length) + prefix[offset + length:]


def _mac_segments(segments: Sequence[SegmentInfo]) -> List[SegmentInfo]:
    return [s for s in segments if s.name == "meta" or s.nbytes <= FULL_MAC_MAX_BYTES]


def snapshot_mac(key: bytes, prefix: bytes, manifest: bytes, payload: torch.Tensor,
                 segments: Sequence[SegmentInfo]) -> bytes:
    """HMAC-SHA256 over the prefix (its MAC field zeroed), the manifest (so every FF31 sum) and the
    bytes of `meta` and of every segment of at most FULL_MAC_MAX_BYTES (`payload`: from payload_off)."""
    h = hmac.new(key, digestmod="sha256")
    h.update(_zeroed(prefix, _MAC_OFFSET, _MAC_LEN))
    h.update(manifest)
    for seg in _mac_segments(segments):
        if seg.nbytes:
            h.update(memoryview(payload[seg.offset:seg.offset + seg.nbytes].numpy()))
    return h.digest()


def snapshot_key() -> bytes:
    """This job's snapshot key: the same in every generation and every run with the same secret."""
    return job_secret().key(Purpose.SNAPSHOT)


def write_header(buf: torch.Tensor, layout: Layout, checksums: Sequence[int], *, step: int, generation: int,
                 rank: int, world_size: int, zero_stage: int, key: Optional[bytes] = None) -> None:
    """Write prefix + manifest (with the packed checksums and the HMAC) into buf[:payload_off].

    The payload must be packed already (the HMAC covers `meta` and the small segments); `key`: the
    job's snapshot key by default."""
    for seg, c in zip(layout.segments, checksums):
        seg.checksum = int(c)
    manifest = layout.manifest_bytes()
    assert len(manifest) == layout.manifest_len
    payload_len = layout.total_bytes - layout.payload_off
    prefix = PREFIX.pack(MAGIC, VERSION, 0, len(manifest), payload_len, step, generation, rank, world_size,
                         zero_stage, 0, bytes(_MAC_LEN))
    crc = zlib.crc32(manifest, zlib.crc32(prefix))
    prefix = prefix[:_CRC_OFFSET] + struct.pack("<I", crc) + prefix[_CRC_OFFSET + 4:]
    tag = snapshot_mac(key or snapshot_key(), prefix, manifest, buf[layout.payload_off:layout.total_bytes],
                       layout.segments)
    prefix = prefix[:_MAC_OFFSET] + tag + prefix[_MAC_OFFSET + _MAC_LEN:]  # after the CRC: it covers zeros here
    head = prefix + manifest + bytes(layout.payload_off - PREFIX.size - len(manifest))
    buf[:layout.payload_off].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))


@dataclass
class ParsedSnapshot:
    """A validated snapshot: header fields and its segments (views into the buffer)."""

    step: int
    generation: int
    rank: int
    world_size: int
    zero_stage: int
    fingerprint: str
    dtype_config: str
    segments: List[SegmentInfo]
    buffer: torch.Tensor = field(repr=False)
    payload_off: int = 0

    def segment_bytes(self, seg: SegmentInfo) -> torch.Tensor:
        start = self.payload_off + seg.offset
        return self.buffer[start:start + seg.nbytes]

    def tensor(self, seg: SegmentInfo) -> torch.Tensor:
        """A fresh tensor (never a view of the buffer: the buffer may be reused)."""
        dtype = _DTYPES[seg.dtype]
        out = torch.empty(seg.shape, dtype=dtype)
        if seg.nbytes:
            out.view(-1).view(torch.uint8).copy_(self.segment_bytes(seg))
        return out


BufferLike = Union[torch.Tensor, bytes, bytearray, memoryview]


def _as_uint8(buf: BufferLike) -> torch.Tensor:
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise SnapshotError("snapshot buffer must be a 1-D uint8 tensor")
        return buf
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=torch.uint8)


def read_snapshot(buf: BufferLike, source: str = "<memory>", verify: bool = True,
                  backend: Optional[str] = None, key: Optional[bytes] = None) -> ParsedSnapshot:
    """Parse and validate a snapshot; raise SnapshotError naming `source` on any defect.

    Checks, in this order: framing, header CRC, manifest, layout and zero padding, every segment's
    FF31 sum (`verify`; corruption is named as such), then the HMAC with `key` (default: this job's
    snapshot key), so a snapshot of another job or an edited one is refused."""
    data = _as_uint8(buf)
    n = data.numel()
    if n < PREFIX.size:
        raise SnapshotError(f"{source}: truncated snapshot ({n} bytes, smaller than the {PREFIX.size}-byte prefix)")
    prefix = bytes(data[:PREFIX.size].numpy())
    magic, version, crc, manifest_len, payload_len, step, gen, rank, world, stage, _, tag = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise SnapshotError(f"{source}: not an fftrainer_ds snapshot (bad magic {magic!r})")
    if version != VERSION:
        raise SnapshotError(f"{source}: snapshot format version {version} is not supported (expected {VERSION})")
    payload_off = PREFIX.size + round_up(manifest_len)
    if n < PREFIX.size + manifest_len:
        raise SnapshotError(f"{source}: truncated snapshot (manifest needs {PREFIX.size + manifest_len} bytes, have {n})")
    manifest = bytes(data[PREFIX.size:PREFIX.size + manifest_len].numpy())
    zeroed = _zeroed(prefix, _CRC_OFFSET, 4)
    zeroed = _zeroed(zeroed, _MAC_OFFSET, _MAC_LEN)  # the CRC is computed before the HMAC is written
    if zlib.crc32(manifest, zlib.crc32(zeroed)) != crc:
        raise SnapshotError(f"{source}: header checksum mismatch (corrupt prefix or manifest)")
    if n < payload_off + payload_len:
        raise SnapshotError(f"{source}: truncated snapshot ({n} bytes, header says {payload_off + payload_len})")
    if n > payload_off + payload_len:
        raise SnapshotError(f"{source}: {n - payload_off - payload_len} unexpected bytes after the payload")
    segs, fingerprint, dtype_config = _parse_manifest(manifest, source)
    parsed = ParsedSnapshot(step, gen, rank, world, stage, fingerprint, dtype_config, segs,
                            data[:payload_off + payload_len], payload_off)
    _check_layout(parsed, manifest_len, payload_len, source)
    if verify:
        _check_sums(parsed, source, backend)
    payload = data[payload_off:payload_off + payload_len]
    if not hmac.compare_digest(tag, snapshot_mac(key or snapshot_key(), prefix, manifest, payload, segs)):
        raise SnapshotError(f"{source}: snapshot authentication failed (HMAC mismatch): written by a job with "
                            f"another secret, or edited after it was written; a snapshot restores only under the "
                            f"secret that wrote it (fftrainer-launch --secret-file / FFTRAINER_SECRET_FILE)")
    return parsed


def _parse_manifest(manifest: bytes, source: str) -> Tuple[List[SegmentInfo], str, str]:
    try:
        doc = json.loads(manifest)
        segs = [SegmentInfo(str(s["name"]), str(s["dtype"]), tuple(int(d) for d in s["shape"]), int(s["offset"]),
                            int(s["nbytes"]), int(s["checksum"], 16)) for s in doc["segments"]]
        fingerprint, dtype_config = str(doc["fingerprint"]), str(doc["dtype_config"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"{source}: malformed manifest ({exc})") from None
    return segs, fingerprint, dtype_config


def _check_layout(parsed: ParsedSnapshot, manifest_len: int, payload_len: int, source: str) -> None:
    """Segments in order, inside the payload, sized as their shape says; every padding byte zero."""
    data, payload_off = parsed.buffer, parsed.payload_off
    gaps, end = [(PREFIX.size + manifest_len, payload_off)], 0
    for seg in parsed.segments:
        if seg.dtype not in _DTYPES or seg.offset < end or seg.offset + seg.nbytes > payload_len \
                or any(d < 0 for d in seg.shape) or seg.nbytes != _numel(seg.shape) * _ITEMSIZE[seg.dtype]:
            raise SnapshotError(f"{source}: segment {seg.name!r} overlaps another, lies outside the payload, "
                                f"has a bad dtype or a size that does not match its shape")
        gaps.append((payload_off + end, payload_off + seg.offset))
        end = seg.offset + seg.nbytes
    for lo, hi in gaps:
        if hi > lo and bool(data[lo:hi].any()):
            raise SnapshotError(f"{source}: non-zero padding bytes at offsets {lo}..{hi} (corrupt snapshot)")


def _numel(shape: Tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _check_sums(parsed: ParsedSnapshot, source: str, backend: Optional[str]) -> None:
    from .. import ops

    for seg in parsed.segments:
        got = ops.checksum(parsed.segment_bytes(seg), backend)
        if got != seg.checksum:
            raise SnapshotError(f"{source}: checksum mismatch in segment {seg.name!r} "
                                f"(stored {seg.checksum:016x}, computed {got:016x})")
