"""Reading video files: frames sampled uniformly, as Video-LLaVA's processor expects (8 by default).

Decoding uses PyAV (``pip install "learnpruner[video]"``), a maintained binding of FFmpeg's libraries.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["read_frames", "write_video"]


def _av():
    try:
        import av
    except ImportError:
        raise ImportError('reading video files needs PyAV: pip install "learnpruner[video]" (or: pip install av)'
                          ) from None
    return av


def read_frames(path: str | os.PathLike, num_frames: int = 8) -> np.ndarray:
    """``[num_frames, H, W, 3]`` uint8 RGB frames at uniformly spaced indices over the whole video.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one that cannot
    be decoded or holds no video frame."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at {path!r}")
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path!r} holds no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path!r}: {e}") from None
    if not frames:
        raise ValueError(f"{path!r} holds no decodable video frame")
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return np.stack([frames[i] for i in idx])


def write_video(path: str | os.PathLike, frames, fps: int = 4) -> None:
    """Encode ``frames`` (``[T, H, W, 3]`` uint8 RGB, even H and W) as an MPEG-4 file (tests and demos)."""
    av = _av()
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
