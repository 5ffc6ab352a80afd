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

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

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
        self._used = 0

    # -- encode -----------------------------------------------------------------------------
    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in _ALLOWED_DTYPE_KINDS:
                raise TypeError(f"arrays of dtype {obj.dtype} cannot go on the wire")
            arr = np.ascontiguousarray(obj)
            self._out.append(arr)
            return (arr.dtype.str, arr.shape, len(self._out) - 1)
        raise NotImplementedError(f"cannot encode {type(obj).__name__}")

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
        try:
            dtype_str, shape, index = obj
            dtype = np.dtype(dtype_str)
            shape = tuple(int(s) for s in shape)
            index = int(index)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"bad array descriptor {obj!r}") from exc
        if dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.hasobject:
            raise CodecError(f"dtype {dtype} not allowed on the wire")
        if len(shape) > _MAX_DIMS or any(s < 0 for s in shape):
            raise CodecError(f"bad array shape {shape}")
        if not 1 <= index + 1 <= len(self._in) - 1:
            raise CodecError(f"array frame {index} missing (got {len(self._in) - 1})")
        buf = _as_buffer(self._in[index + 1])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if buf.nbytes != expected:
            raise CodecError(f"array frame {index} has {buf.nbytes} bytes, expected {expected}")
        self._used += 1
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def decode(self, frames: Sequence[Any]) -> Envelope:
        """Decode frames (bytes, memoryviews or ``zmq.Frame``) into an envelope.

        Arrays in the result are read-only views on the received frames (zero-copy).
        """
        if not frames:
            raise CodecError("empty message")
        self._in = frames
        self._used = 0
        try:
            env = self._decoder.decode(_as_buffer(frames[0]))
        except CodecError:
            raise
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            raise CodecError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        finally:
            self._in = ()
        if env.v != WIRE_VERSION:
            raise CodecError(f"wire version {env.v}, expected {WIRE_VERSION}")
        if env.kind != KIND_OF[type(env.payload)]:
            raise CodecError(f"kind {env.kind!r} does not match payload {type(env.payload).__name__}")
        if self._used != len(frames) - 1:
            raise CodecError(f"{len(frames) - 1} array frames sent, {self._used} referenced")
        return env


def _as_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is not None:
        return buf if isinstance(buf, memoryview) else memoryview(buf)
    return memoryview(frame).cast("B") if not isinstance(frame, memoryview) else frame
