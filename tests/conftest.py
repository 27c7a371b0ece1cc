import os
import sys
import tempfile
from pathlib import Path

# Tests import their builders from tests/helpers.py.
sys.path.insert(0, str(Path(__file__).parent))
# bitsandbytes and transformers are chatty on import; the tests assert on our output, not theirs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Never touch the user's own caches: each test session gets fresh ones (tests that need more set their own).
_scratch = tempfile.mkdtemp(prefix="localgpt-tests-")
os.environ["LOCALGPT_HOME"] = os.path.join(_scratch, "home")
os.environ["HF_HOME"] = os.path.join(_scratch, "hf")
