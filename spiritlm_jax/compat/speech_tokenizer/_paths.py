"""Where the original's factories look for checkpoints: $SPIRITLM_CHECKPOINTS_DIR (else ./checkpoints)
+ ``speech_tokenizer/``, read when a factory is called (not at import, so setting the variable later works)."""
from __future__ import annotations

import os
from pathlib import Path

from spiritlm_jax.speech import checkpoints_root


def speech_dir(root: str | os.PathLike | None = None) -> Path:
    base = checkpoints_root(root)
    return base / "speech_tokenizer" if (base / "speech_tokenizer").is_dir() else base
