"""
Helpers for the fuzz tests of the MLS parsers (L{fedserver_mimi.keypackage},
L{fedserver_mimi.messages}): mutations of valid encodings.
"""

from __future__ import annotations

from hypothesis import strategies as st

#: up to four (operation, position, value) edits for L{mutate}
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(min_value=0, max_value=10_000),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    """C{data} with each of C{mutations} applied in turn, its position taken modulo the current length."""
    buf = bytearray(data)
    for op, pos, value in mutations:
        if not buf:
            break
        i = pos % len(buf)
        if op == "flip":
            buf[i] ^= 1 << (value % 8)
        elif op == "set":
            buf[i] = value
        elif op == "insert":
            buf[i:i] = bytes([value])
        elif op == "delete":
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)
