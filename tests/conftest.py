import os
import tempfile

import torch

# Generated sources go to a fresh cache directory per test session.
os.environ["ATTNCC_CACHE_DIR"] = tempfile.mkdtemp(prefix="attncc-test-cache-")

if not torch.cuda.is_available():
    # Without a GPU the triton backend runs in Triton's interpreter, which must be chosen before anything
    # imports triton (torch.compile's machinery may), whichever test file a process runs first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
