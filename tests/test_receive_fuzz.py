"""The receive path under any input: what the broker sends, cut anywhere, decodes as paho decodes it.

mqttd reads the socket through ``pahofast.RecvBuffer`` and decodes PUBLISH packets with its own
``decode.decode_publish`` (from the buffer, or in its ``_handle_publish``); QoS 2 is taken
like QoS 1 and PUBREL is answered at once. These properties hold that path against an unmodified
paho client reading the same bytes with its own reader and decoder: the same messages come out
in the same order, and the stream ends the same way (the same protocol error at the same packet,
or the same exception type where paho itself raises). ``scripts/fuzz_receive`` runs them longer.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# the reference decoder (paho 2.2); paho 2.1 has none, and there these properties cannot be run
pytest.importorskip("paho.mqtt._packet")
from lab.fuzz import check_decoder, check_stream, frame, mutated, publishes, streams  # noqa: E402

EXAMPLES = 300


# ---- the properties --------------------------------------------------------------------------------

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(streams(), st.booleans())
def test_any_stream_cut_anywhere_reads_as_paho_reads_it(stream_cuts, v5):
    stream, cuts = stream_cuts
    check_stream(stream, cuts, v5)


@FUZZ
@given(st.one_of(publishes(), mutated(), st.tuples(st.integers(0x30, 0x3F), st.binary(max_size=30))), st.booleans())
def test_our_publish_decoder_decodes_what_paho_decodes(packet, v5):
    header, body = packet
    check_decoder(header, body, v5)


def test_the_known_hard_cases():
    """Cases that once told the two apart, or nearly: kept as plain examples."""
    for v5 in (True, False):
        check_decoder(0x30, b"", v5)                                   # no topic length at all
        check_decoder(0x32, b"\x00\x01t\x00", v5)                      # a packet id cut short
        check_decoder(0x36, b"\x00\x01t\x00\x01\x00", v5)              # QoS 3
        check_decoder(0x30, b"\x00\x00", v5)                           # empty topic, no properties byte
        check_decoder(0x30, b"\x00\x02t", v5)                         # a topic one byte past the end
        check_decoder(0x30, b"\x00\x01t\x05\x01", v5)                  # properties longer than the packet
        check_decoder(0x30, b"\x00\x01t\x01\x02\x00\x00\x00\x05p", v5) # a property that reads into the payload
        check_stream(frame(0x34, b"\x00\x01t\x00\x09\x00z") + frame(0x62, b"\x00\x09"), [3, 9], v5)
        check_stream(bytes([0x32, 0x80, 0x80, 0x80, 0x80, 0x01]), [2], v5)
        two = frame(0x30, b"\x00\x01tabc" if not v5 else b"\x00\x01t\x00abc") * 2
        for short in (1, 2):                                           # the second one short of its end
            check_stream(two, [len(two) - short], v5)
