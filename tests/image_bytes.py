"""Image files built byte by byte for tests (shared by the prep, data and serve tests)."""
import struct
import zlib


def png_header(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height pixels (and holds no pixel
    data): a pixel bomb for any width x height, a zero-size image for 0."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
