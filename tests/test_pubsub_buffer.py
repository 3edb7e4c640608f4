"""The bounded buffer between the socket reader and a consumer, against a list model.

Pure Python (no server): the reader side (messages and gap notices arriving) and the
consumer side (taking items) interleave in any order hypothesis finds.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from aioredispatterns._pubsub_hub import Sink
from aioredispatterns.pubsub import BufferPolicy, Gap, PubSubOverflow

OPS = st.lists(st.sampled_from(["message", "gap", "take"]), max_size=80)


def _gap() -> Gap:
    return Gap(duration=0.5, attempts=1, cause="test")


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 6), overflow=st.sampled_from(["drop_oldest", "drop_newest"]), ops=OPS)
def test_buffer_matches_model(size: int, overflow: Any, ops: list[str]) -> None:
    sink = Sink(BufferPolicy(size, overflow))
    model: list[Any] = []  # items in order; ints are messages
    sent = 0
    taken: list[Any] = []
    for op in ops:
        if op == "message":
            sent += 1
            if sum(1 for x in model if isinstance(x, int)) >= size:
                if overflow == "drop_newest":
                    sink.put(sent)
                    continue
                oldest = next(i for i, x in enumerate(model) if isinstance(x, int))
                del model[oldest]
            model.append(sent)
            sink.put(sent)
        elif op == "gap":
            if model and isinstance(model[-1], Gap):  # consecutive gaps merge
                model[-1] = Gap(model[-1].duration + 0.5, model[-1].attempts + 1, "test")
            else:
                model.append(_gap())
            sink.put_gap(_gap())
        elif model:
            taken.append(sink.pop())
            expected = model.pop(0)
            assert taken[-1] == expected
        # Invariants after every step:
        assert list(sink.queue) == model
        assert sink.buffered == sum(1 for x in model if isinstance(x, int)) <= size
        assert sink.received == sent
        assert sink.received == sink.delivered + sink.dropped + sink.buffered
    assert sink.gaps == ops.count("gap")  # no gap notice is ever dropped


def test_error_policy_fails_and_discards_the_backlog() -> None:
    sink = Sink(BufferPolicy(2, "error"))
    sink.put(1)
    sink.put_gap(_gap())
    sink.put(2)
    sink.put(3)
    assert isinstance(sink.failure, PubSubOverflow)
    assert (sink.received, sink.dropped, sink.buffered, sink.delivered) == (3, 3, 0, 0)
    sink.put(4)  # ignored once failed
    assert sink.received == 3
