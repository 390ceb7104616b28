"""Worker modules for tests of rlhf.runtime.jobs: real processes, no model training."""
