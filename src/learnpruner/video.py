"""Reading video files: frames sampled uniformly, as Video-LLaVA's processor expects (8 by default).

Decoding uses PyAV (``pip install "learnpruner[video]"``), a maintained binding of FFmpeg's libraries.
"""

from __future__ import annotations

import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["read_frames", "write_video"]


def _av():
    try:
        import av
    except ImportError:
        raise ImportError('reading video files needs PyAV: pip install "learnpruner[video]" (or: pip install av)'
                          ) from None
    return av


def _count_frames(container) -> int:
    """Frames in the container's first video stream: the header's count, else its packets counted (demuxed,
    not decoded: no frame is held in memory)."""
    stream = container.streams.video[0]
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def read_frames(path: str | os.PathLike, num_frames: int = 8) -> np.ndarray:
    """``[num_frames, H, W, 3]`` uint8 RGB frames at uniformly spaced indices over the whole video.

    Only the sampled frames are converted and kept (memory: ``num_frames`` frames, whatever the video's length);
    the others are decoded and dropped. A file with fewer frames than ``num_frames`` gives each of its frames once
    (capped, with a warning). Raises ``FileNotFoundError`` for a missing file, and ``ValueError`` naming the file
    for one that cannot be decoded or holds no video frame."""
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at {path!r}")
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path!r} holds no video stream")
            total = _count_frames(container)
            if total == 0:
                raise ValueError(f"{path!r} holds no decodable video frame")
            if num_frames > total:  # capped: every frame once, never a tensor of repeated frames
                logger.warning("%r holds %d frames, fewer than the %d asked for: all %d are used", path, total,
                               num_frames, total)
                num_frames = total
            wanted = np.linspace(0, total - 1, num_frames).round().astype(int)
            keep = set(wanted.tolist())
            frames: dict[int, np.ndarray] = {}
            for i, frame in enumerate(container.decode(video=0)):
                if i in keep:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path!r}: {e}") from None
    if not frames:
        raise ValueError(f"{path!r} holds no decodable video frame")
    # a header that promised more frames than decoding gave: a missing index takes the nearest earlier frame
    have = sorted(frames)
    return np.stack([frames[max([j for j in have if j <= i] or have[:1])] for i in wanted.tolist()])


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
