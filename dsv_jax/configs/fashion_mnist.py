"""Fashion-MNIST (28x28 grey, 10 classes): the main offline experiment.

Read from the IDX files of Debian's `dataset-fashion-mnist` package
(/usr/share/datasets/fashion-mnist) when present, else from TFDS.
"""

from dsv_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, tiny=False)
  c = common.base_config()
  c.data.name = "fashion_mnist"
  # Width 32 keeps training, whole-training-set selection and the report's
  # retrainings within hours on 2 CPU cores (docs/method.md, choices: the
  # Fashion-MNIST classifier).
  c.model.width = 32
  c.model.depth = 3
  c.train.steps = 3000
  c.train.batch_size = 128
  c.train.flip = True
  c.train.max_shift = 2
  c.train.eval_every = 1000
  c.train.log_every = 200
  c.train.ckpt_every = 500
  # Synthesis: A(x) uses the paper's strengths (flip 0.5: the classifier
  # was trained with flips). One recipe per init kind, chosen on the
  # validation split (docs/method.md, choices; benchmarks/synth_sweep.md).
  # Noise: 1000 steps at lr 0.05 with the TV and norm priors, the norm
  # towards the dark background.
  c.synth.steps = 1000
  c.synth.lr_x = 0.05
  c.kkt.beta_tv = 1.0
  c.kkt.beta_norm = 1.0
  c.kkt.norm_center = "min"
  # Real images (k-shot, editing, interpolation): 500 steps at lr 0.03,
  # no priors.
  c.synth.image_steps = 500
  c.synth.image_lr_x = 0.03
  # 0-shot DSVs start from the bundled 8x8 digits upsampled to 28x28: 500
  # steps at lr 0.03, no priors. Swept on validation at 250-2000 steps, lr
  # 0.01-0.1, priors on and off: 500 steps retrained best and 1000 was no
  # better at twice the cost; priors and lr 0.1 lost (synth_sweep.md).
  c.synth.other_dataset = "digits"
  c.synth.other_steps = 500
  c.synth.other_lr_x = 0.03
  # 1 and 10 images per class, as digits (docs/method.md, choices: the
  # Fashion-MNIST pipeline's budget). The paper's third size, 50:
  # --config.report.ipc='(1,10,50)'; every sub-run and retraining is cached,
  # so adding it reuses the rest.
  c.report.ipc = (1, 10)
  # Selection over the 54,000 training images: 90 s per FISTA iteration on
  # 2 idle cores, so progress and a checkpoint every iteration. 40
  # iterations: the ranking by contribution settles by the second, but the
  # paper's ranking by lambda has not at the tenth (its top-k per class
  # there shares under 2% with the fortieth, while the 39th and 40th share
  # 96-100%; benchmarks/docs/select.md, ranking_stability). Raising
  # select.max_iters resumes a finished fit.
  c.select.max_iters = 40
  c.select.log_every = 1
  c.select.ckpt_every = 1
  # Retraining recipe, chosen on the validation split from random real
  # images only, so it cannot favour DSVs (docs/method.md, choices:
  # retraining recipe). Flips and 2-pixel shifts as in the classifier's
  # training.
  # EL2N baseline of the coreset table: scored after 10% of training.
  c.report.el2n_steps = 300
  c.retrain.learning_rate = 1e-3
  c.retrain.batch_size = 32
  c.retrain.steps = 400
  c.retrain.flip = True
  c.retrain.max_shift = 2
  if args.tiny:
    common.apply_tiny(c)
  return c
