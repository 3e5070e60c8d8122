"""``python -m scripts.evaluate`` from a checkout: sal_harness.evaluate
(evaluate a run folder's newest checkpoint)."""

from sal_harness.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
