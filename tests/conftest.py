"""Shared test setup: no model hub, deterministic Hypothesis."""
import os

# transformers reads this at import time: with it, a missing model fails at once instead of after
# ~25 s of network retries (ENV_NOTES). Set before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# CI profile: derandomised so a run is reproducible, and no deadline because torch's first call of
# each kernel is slow. HYPOTHESIS_PROFILE=dev gives more, random examples for local hunting.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
