"""``python -m scripts.train`` from a checkout: sal_harness.train
(one training run: hydra overrides, --multirun)."""

from sal_harness.train import main

if __name__ == "__main__":
    main()
