"""The sampler's VIDEO output: the MP4 written to ComfyUI's temp folder while the video streams, kept on disk
once only.

- Saved (Save Video, same container and codec): the saved file is a stream copy with the workflow metadata;
  this VIDEO then reads from the saved file and the temp file is removed at once.
- Not saved: the temp file lives as long as ComfyUI holds this output (its cache drops it when the sampler
  runs again or the output is no longer needed) and is removed then, or when the server exits.
"""

from __future__ import annotations

import os
import weakref

from comfy_api.latest import InputImpl, Types


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StreamedVideo(InputImpl.VideoFromFile):
    def __init__(self, temp_path: str | os.PathLike):
        super().__init__(str(temp_path))
        self._temp = weakref.finalize(self, _remove, str(temp_path))

    @property
    def temp_path(self) -> str | None:
        """The temp file while it still exists, else None."""
        return self._temp.peek()[1][0] if self._temp.alive else None

    def save_to(self, path, format=Types.VideoContainer.AUTO, codec=Types.VideoCodec.AUTO, metadata=None):
        super().save_to(path, format=format, codec=codec, metadata=metadata)
        same = format in (Types.VideoContainer.AUTO, Types.VideoContainer.MP4) and \
            codec in (Types.VideoCodec.AUTO, Types.VideoCodec.H264)
        if same and self._temp.alive and isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            InputImpl.VideoFromFile.__init__(self, os.fspath(path))  # later readers use the saved copy
            self._temp()  # and the temp copy goes
