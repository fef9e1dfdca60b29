import os
import tempfile

# Generated sources go to a fresh cache directory per test session.
os.environ["ATTNCC_CACHE_DIR"] = tempfile.mkdtemp(prefix="attncc-test-cache-")
