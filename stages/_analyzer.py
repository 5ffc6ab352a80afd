"""The stage every encoder is: one payload type in, one ``Features`` out on ``features``.

An encoder keeps its numeric work in a plain analyzer class that a test can feed arrays to
(:class:`stages.motion.MotionAnalyzer`, :class:`stages.hud.HudAnalyzer`, ...).  The stage
around it only builds the analyzer and turns each input into a ``Features``; that wrapper was
written out once per encoder, with its own payload check and emit.  :class:`AnalyzerStage` is
the wrapper, written once::

    @register_stage("motion")
    class MotionStage(AnalyzerStage[MotionParams, VideoFrame]):
        Params = MotionParams
        accepts = (VideoFrame,)

        def __init__(self, ctx: StageContext, params: MotionParams) -> None:
            super().__init__(ctx, params)
            self.analyzer = MotionAnalyzer(params.stride, params.threshold, params.reset_lag_s)

        def analyze(self, frame: VideoFrame, t_media: float) -> Features:
            return Features(name="motion", values=self.analyzer.update(frame.image, t_media, frame.pixel_format))
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar, cast

from copilot.messages import Envelope, Features
from copilot.stage import P, Stage

In = TypeVar("In")  # the one payload type the stage takes (its ``accepts``)


class AnalyzerStage(Stage[P], Generic[P, In]):
    """An encoder stage: :meth:`analyze` each accepted input, emit the result on ``features``.

    ``accepts`` must name the payload type ``In`` (the runner drops anything else, so
    :meth:`analyze` gets only those); a subclass without it is refused when it is defined.
    """

    output_ports: ClassVar[tuple[str, ...]] = ("features",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.accepts:
            raise TypeError(f"{cls.__name__}: an AnalyzerStage declares the payload type it takes in accepts")

    def analyze(self, payload: In, t_media: float) -> Features | None:
        """The features of one input, or None when there is nothing to say about it yet."""
        raise NotImplementedError(f"{type(self).__name__}.analyze")

    async def process(self, msg: Envelope) -> None:
        # (the cast holds: the runner has dropped every payload that ``accepts`` does not name)
        features = self.analyze(cast(In, msg.payload), msg.t_media)
        if features is not None:
            await self.emit("features", features, parent=msg)
