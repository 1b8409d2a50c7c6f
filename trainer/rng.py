"""Counter-based seeds: every random draw is keyed by what it is for, never by rank.

Principle 4 (DESIGN.md): training is a pure function of (seed, step, sample
index). Instead of one stream per process (whose position depends on how much
work the process did), each draw gets its own generator seeded from a hash of
its key, e.g. (seed, "dropout", step, sample, layer, site).
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1

# Purposes, so keys of different uses never collide.
INIT, DATA_ORDER, DATA_SAMPLE, DROPOUT = 1, 2, 3, 4


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    h = 0x243F6A8885A308D3
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def name_key(name: str) -> int:
    """Stable integer for a string (Python's hash() is salted per process)."""
    h = 0
    for byte in name.encode():
        h = _splitmix64(h ^ byte)
    return h
