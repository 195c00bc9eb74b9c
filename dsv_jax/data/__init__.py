"""In-memory image classification datasets with fixed, documented splits.

`load_dataset(name)` returns a `Dataset`: `DatasetInfo` metadata plus three
numpy splits ``{"image": f32[N, H, W, C], "label": i32[N]}``, images
normalised per channel. It never downloads anything.

Datasets (``name``):
  * ``digits``: scikit-learn's bundled 8x8x1 digits (1797 images, values
    0..16 scaled by 1/16), 10 classes. Needs nothing offline; the default.
  * ``fashion_mnist``, ``mnist``: 28x28x1, 10 classes, from the four IDX
    files (``train-images-idx3-ubyte[.gz]`` ...) in ``data_dir``. Without
    ``data_dir``, Fashion-MNIST is looked for in
    ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``). With no IDX files found, prepared TFDS data
    (``data_dir`` or TFDS's default directory) is read instead.
  * ``idx``: any folder of such IDX files (``data_dir`` required); classes
    inferred from the labels unless ``num_classes`` is given.
  * ``cifar10``, ``cifar100``, ``svhn_cropped`` and ``tfds:<name>`` for any
    TFDS image classification dataset with ``image`` and ``label``
    features, read with `tfds.data_source` from data prepared in the
    ArrayRecord format (no TensorFlow needed to read it).
  * ``imagenet2012``: TFDS's ImageNet-1k (prepared from the manually
    downloaded ILSVRC2012 tar files), 1000 classes, RGB photos of any size
    brought to ``image_size`` squared (default 224) by torchvision's
    evaluation transform (`imagenet.eval_transform`). Read as seeded random
    subsets only (``max_train`` required); its splits and normalisation
    differ from the rules below, see `load_dataset`.

Splits. The test split is the dataset's own, except for digits, whose 539
test images (30%, rounded) are a stratified draw. The validation split is
10% of the training data (rounded), a stratified draw; both draws use the
fixed seed ``SPLIT_SEED`` = 2024, so these splits are the same in every run
whatever the experiment's seed. All tuning uses validation; test is only
reported. Sizes (train / validation / test):
  * digits: 1132 / 126 / 539
  * mnist, fashion_mnist: 54000 / 6000 / 10000
  * cifar10, cifar100: 45000 / 5000 / 10000
  * svhn_cropped: 65931 / 7326 / 26032
``max_train`` / ``max_validation`` / ``max_test`` take stratified subsets
drawn with ``seed`` (for quick runs).

Normalisation. Raw pixels are scaled to [0, 1] (``/16`` for digits, ``/255``
otherwise), then ``(x - mean) / std`` per channel with mean and std computed
exactly over the training split (after the validation carve, before any
``max_*`` subset), so they are fixed per dataset and split seed. Recorded in
``DatasetInfo.mean``/``std``; for the default splits:
  * digits: mean 0.30529, std 0.37613 (pixel range [-0.8117, 1.8470])
  * fashion_mnist: mean 0.28630, std 0.35328 (pixel range [-0.8104, 2.0202])
Synthesis clips to ``DatasetInfo.pixel_min``/``pixel_max``; images are shown
via ``DatasetInfo.denormalize``.
"""

from dsv_jax.data.core import (
  SPLITS,
  Dataset,
  DatasetInfo,
  validate_split,
)
from dsv_jax.data.idx import read_idx
from dsv_jax.data.loading import (
  KNOWN_NAMES,
  SPLIT_SEED,
  VALIDATION_FRACTION,
  load_dataset,
)

__all__ = [
  "KNOWN_NAMES",
  "SPLITS",
  "SPLIT_SEED",
  "VALIDATION_FRACTION",
  "Dataset",
  "DatasetInfo",
  "load_dataset",
  "read_idx",
  "validate_split",
]
