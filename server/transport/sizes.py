"""How big an answer can get, known before any work is done for it.

gRPC refuses to send a message over the send limit, and only finds out once the answer is built:
the work done for nothing, the call failed with an error that names no cause. So every inference
request is checked first against an upper bound of its answer's size, worked out from what it asks
for (images, classes per image, outputs) and what it echoes (an id, a model name). The bounds are
generous (each class entry at the size of the longest label) and cheap (a few multiplications).
"""

from __future__ import annotations

from mobiserve.common.labels import Labels
from mobiserve.server.errors import InvalidInput

MAX_ID_BYTES = 1024  # an id is echoed in the answer: request_id, the protocol's id, x-request-id
FIELD = 6  # a field's tag and length prefix, at most (messages under 2 GiB)
NUMBER = 11  # a varint field: tag and up to 10 bytes
ERROR_BYTES = 1024  # a stream answer's error: its code and a message (capped at 512 characters)

_longest: dict[int, tuple[Labels, int, int]] = {}  # id(labels) -> (labels, wnid bytes, name bytes)


def longest_labels(labels: Labels) -> tuple[int, int]:
    """The longest WordNet id and class name, in UTF-8 bytes (computed once per set of labels)."""
    known = _longest.get(id(labels))
    if known is None or known[0] is not labels:
        wnid = max((len(w.encode()) for w in labels.wnids), default=0)
        name = max((len(n.encode()) for n in labels.names), default=0)
        known = _longest[id(labels)] = (labels, wnid, name)
    return known[1], known[2]


def check_id(request_id: str) -> None:
    if len(request_id) * 4 > MAX_ID_BYTES and (size := len(request_id.encode())) > MAX_ID_BYTES:
        raise InvalidInput(f"the request id is {size} bytes; the limit is {MAX_ID_BYTES}")


def echoed(value: str) -> str:
    """`value` cut to the id limit, for a failure's answer to echo: never a huge one."""
    if len(value) * 4 <= MAX_ID_BYTES:
        return value
    return value.encode()[:MAX_ID_BYTES].decode(errors="ignore")


def check_fits(answer_bytes: int, limit: int, what: str) -> None:
    """Refuse a request whose answer could exceed the message limit, saying what makes it big."""
    if answer_bytes > limit:
        raise InvalidInput(
            f"the answer would be up to {answer_bytes / 1e6:.1f} MB, over the {limit / (1 << 20):g} MiB"
            f" message limit; ask for fewer {what} in one request"
        )
