"""HTTP/2 flow control as both sides of the sidecar drive the ``h2`` codec: a stream's body
sent as far as the peer's windows take it (``send_pieces``: ``h2stream`` to clients,
``h2upstream`` to endpoints), and window given back in batches (``give_back``).
"""

from __future__ import annotations

from collections import deque
from typing import Final

from h2.connection import H2Connection
from h2.exceptions import FlowControlError

OWED_MAX: Final = 64 * 1024
"""bytes of connection window owed to a peer before one WINDOW_UPDATE gives them back"""


def send_pieces(
    h2: H2Connection, stream_id: int, pieces: deque[bytes], last: bool
) -> tuple[int, bool]:
    """Send ``pieces`` (taken off the front) as far as the windows take them; ``last``:
    the last piece ends the stream. Each piece goes whole while the windows take it, as is
    common: the codec checks them itself and refuses before it sends, so no window is
    looked up a piece; once one does not fit, what the windows take of it. The bytes sent,
    and whether the stream was ended."""
    sent, fin = 0, False
    whole = True
    while pieces:
        piece = pieces[0]
        if whole and len(piece) <= h2.max_outbound_frame_size:
            fin = last and len(pieces) == 1
            try:
                h2.send_data(stream_id, piece, end_stream=fin)
            except FlowControlError:
                whole = fin = False  # (as much as the windows take, below)
            else:
                pieces.popleft()
                sent += len(piece)
                continue
        room = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
        if room <= 0:
            break
        piece = pieces.popleft()
        if len(piece) > room:
            pieces.appendleft(piece[room:])
            piece = piece[:room]
        fin = last and not pieces  # (the last piece ends the stream: no empty DATA after it)
        h2.send_data(stream_id, piece, end_stream=fin)
        sent += len(piece)
    return sent, fin


def give_back(h2: H2Connection, owed: int, n: int, stream_id: int) -> int:
    """``n`` more bytes of window owed to the peer on top of ``owed``; once ``OWED_MAX``
    are, all of it goes back in one acknowledgement. What is still owed after. DATA of a
    stream the peer ended (or of one gone) takes the connection's window only, so one call
    of the codec acknowledges many unary bodies (each a Python call chain of ~10k
    instructions), and the peer's connection window is at most that much short."""
    owed += n
    if owed < OWED_MAX:
        return owed
    h2.acknowledge_received_data(owed, stream_id)  # (the stream's own: no matter)
    return 0
