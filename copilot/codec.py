"""Wire codec: an envelope becomes one msgpack header frame plus one frame per array.

Arrays are never serialised into the header.  The header records ``(dtype, shape, index)``
for each array and the array's memory goes out as its own ZeroMQ frame (``copy=False``), so a
720p frame crosses a socket without a Python-side copy on either end: the receiver wraps the
frame's buffer with ``np.frombuffer``.  This is the layout vLLM's ``serial_utils`` and
pyzmq's ``serialsocket`` example use.  Pickle is never used.

Anything malformed, truncated, of another wire version or of an unknown kind raises
:class:`CodecError`; receivers count those and carry on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from copilot.errors import first_line
from copilot.messages import KIND_OF, WIRE_VERSION, Envelope

# dtype kinds allowed on the wire: bool, signed/unsigned int, float.  Never object arrays.
_ALLOWED_DTYPE_KINDS = frozenset("biuf")
_MAX_DIMS = 8

Buffer = bytes | bytearray | memoryview | np.ndarray


class CodecError(ValueError):
    """A message that cannot be decoded: malformed, truncated, wrong version or unknown kind."""


class Codec:
    """Encodes and decodes envelopes.  One instance per socket: decoding is not reentrant."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._decoder = msgspec.msgpack.Decoder(Envelope, dec_hook=self._dec_hook)
        self._out: list[np.ndarray] = []
        self._in: Sequence[Any] = ()
        self._used: set[int] = set()

    # -- encode -----------------------------------------------------------------------------
    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in _ALLOWED_DTYPE_KINDS:
                raise TypeError(f"arrays of dtype {obj.dtype} cannot go on the wire")
            arr = np.ascontiguousarray(obj)
            self._out.append(arr)
            return (arr.dtype.str, arr.shape, len(self._out) - 1)
        if isinstance(obj, np.generic) and obj.dtype.kind in _ALLOWED_DTYPE_KINDS:
            return obj.item()  # a numpy scalar in a dict of values: send the plain number
        raise TypeError(f"cannot encode a {type(obj).__module__}.{type(obj).__qualname__} in a message")

    def encode(self, env: Envelope) -> list[Buffer]:
        """Return the frames for ``env``: the header first, then each array's memory."""
        self._out = []
        try:
            header = self._encoder.encode(env)
            return [header, *self._out]
        finally:
            self._out = []

    # -- decode -----------------------------------------------------------------------------
    def _dec_hook(self, typ: type, obj: Any) -> Any:
        if typ is not np.ndarray:
            raise NotImplementedError(f"cannot decode {typ}")
        # Exactly (str, [int, ...], int) as _enc_hook writes it: nothing is coerced, so a
        # float index, a string shape or a missing dtype is rejected rather than guessed at.
        if not (isinstance(obj, (list, tuple)) and len(obj) == 3):
            raise CodecError(f"bad array descriptor {obj!r}")
        dtype_str, shape, index = obj
        if (
            not isinstance(dtype_str, str)
            or not isinstance(shape, (list, tuple))
            or any(type(s) is not int for s in shape)
            or type(index) is not int
        ):
            raise CodecError(f"bad array descriptor {obj!r}")
        try:
            dtype = np.dtype(dtype_str)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"bad array dtype {dtype_str!r}") from exc
        shape = tuple(shape)
        if dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.hasobject:
            raise CodecError(f"dtype {dtype} not allowed on the wire")
        if len(shape) > _MAX_DIMS or any(s < 0 for s in shape):
            raise CodecError(f"bad array shape {shape}")
        if not 1 <= index + 1 <= len(self._in) - 1:
            raise CodecError(f"array frame {index} missing (got {len(self._in) - 1})")
        buf = _as_buffer(self._in[index + 1])
        expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge shape cannot wrap around
        if buf.nbytes != expected:
            raise CodecError(f"array frame {index} has {buf.nbytes} bytes, expected {expected}")
        if index in self._used:
            raise CodecError(f"array frame {index} referenced twice")
        self._used.add(index)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def decode(self, frames: Sequence[Any]) -> Envelope:
        """Decode frames (bytes, memoryviews or ``zmq.Frame``) into an envelope.

        Arrays in the result are read-only views on the received frames (zero-copy).
        """
        if not frames:
            raise CodecError("empty message")
        self._in = frames
        self._used = set()
        try:
            env = self._decoder.decode(_as_buffer(frames[0]))
        except CodecError:
            raise
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            raise CodecError(first_line(exc)) from exc
        finally:
            self._in = ()
        if env.v != WIRE_VERSION:
            raise CodecError(f"wire version {env.v}, expected {WIRE_VERSION}")
        if env.kind != KIND_OF[type(env.payload)]:
            raise CodecError(f"kind {env.kind!r} does not match payload {type(env.payload).__name__}")
        if len(self._used) != len(frames) - 1:
            raise CodecError(f"{len(frames) - 1} array frames sent, {len(self._used)} referenced")
        return env


def _as_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is not None:
        return buf if isinstance(buf, memoryview) else memoryview(buf)
    if isinstance(frame, np.ndarray):  # an encoded frame handed over without a socket
        return memoryview(np.ascontiguousarray(frame).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    mv = frame if isinstance(frame, memoryview) else memoryview(frame)
    if mv.nbytes == 0:
        return memoryview(b"")  # cast() refuses views with a zero in their shape
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")
