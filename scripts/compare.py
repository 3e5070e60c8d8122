"""``python -m scripts.compare`` from a checkout: sal_harness.compare
(the main job: dense, window, NSA, SCOPE side by side)."""

from sal_harness.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
