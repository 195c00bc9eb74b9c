"""Config of benchmarks/reconstruct.py: Haim et al. 2022's reconstruction.

A bias-free (homogeneous) ReLU MLP trained full-batch to a vanishing loss on
a small two-class subset; DeepKKT synthesis and the Haim/Buzaglo baseline
then fit 2x as many candidates as training images, and each training (and
held-out) image is matched to its most similar candidate by SSIM.

  python benchmarks/reconstruct.py --config configs/reconstruct.py:digits
  python benchmarks/reconstruct.py --config configs/reconstruct.py:fashion \\
      --config.data.num_train=100 --config.model.width=1000

Presets: ``digits`` (8x8 scikit-learn digits), ``fashion`` (28x28
Fashion-MNIST, `apt-get install dataset-fashion-mnist`), ``tiny`` (the
test's: seconds).
"""

import ml_collections

PRESETS = ("digits", "fashion", "tiny")


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"Unknown preset {arg!r}; expected one of {PRESETS}.")
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist" if arg == "fashion" else "digits"
  # Two classes: digits 0 vs 1; Fashion-MNIST T-shirt/top vs trouser.
  c.data.classes = (0, 1)
  c.data.num_train = 20 if arg == "tiny" else 50  # Both classes together.
  c.data.num_heldout = 20 if arg == "tiny" else 50

  c.model = ml_collections.ConfigDict()
  c.model.width = 32 if arg == "tiny" else 1000
  c.model.depth = 2  # Hidden layers (Haim et al.: 2 of 1000, no biases).
  # Scale of the initial weights relative to LeCun normal: Haim et al.
  # train from a small initialisation, so that the trained weights are
  # their learned part (near a KKT point), not their random start.
  c.model.init_scale = 0.01

  c.train = ml_collections.ConfigDict()
  c.train.lr = 0.05  # Gradient descent, momentum 0.9, full batch.
  c.train.max_steps = 5000 if arg == "tiny" else 30_000
  c.train.target_loss = 1e-5 if arg == "tiny" else 1e-6  # Mean CE.

  c.recon = ml_collections.ConfigDict()
  c.recon.candidates_per_image = 2  # Haim et al.: 2x the training set.
  c.recon.steps = 20 if arg == "tiny" else 3000
  c.recon.lr_x = 0.01  # Adam on pixels in [0, 1], both methods.
  # Candidates start at the training set's mean image plus N(0, s^2).
  c.recon.noise_scale = 0.1
  c.recon.ssim_pass = 0.4  # Haim et al.'s "good reconstruction" SSIM.
  return c


__all__ = ["PRESETS", "get_config"]
