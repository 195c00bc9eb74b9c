"""Shared pieces of the dataset configs: the base layout and arg parsing.

A config has the sections `seed, stage, data, model, train` (classifier),
`kkt` (the DeepKKT objective's weights) and `synth`, `edit`, `interpolate`
(DSV synthesis and its uses). Every field exists in the base config with its
type, so a typo on the command line (`--config.train.stepz=3`) or a wrong
type fails fast with the key's name (ml_collections' type-safe, locked
ConfigDict).
"""

import ml_collections

from dsv_jax import kkt, select

# Variants every dataset config understands through `:arg`.
VARIANTS = ("tiny",)


def parse_arg(arg: str | None, **defaults):
  """Parses `"a=1,b=foo,flag"` into a ConfigDict over `defaults`.

  Each key must be one of `defaults`; values are converted to the type of
  the default (a bare key sets a bool default to True). Unknown keys raise.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
        f"Unknown config arg {key!r}; expected one of {sorted(defaults)}."
      )
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Fields common to every dataset; dataset configs override values."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = "all"
  _data_and_model(c)
  _training(c)
  _synthesis(c)
  _selection(c)
  _evaluation(c)
  return c


def _data_and_model(c: ml_collections.ConfigDict) -> None:
  """The data and model sections."""
  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  # Folder with the dataset (IDX files or prepared TFDS data); "" = default.
  c.data.data_dir = ""
  # Stratified subset sizes for quick runs; 0 = the whole split.
  c.data.max_train = 0
  # Side images of variable size (ImageNet) are resized and centre-cropped
  # to on reading; 0 = the dataset's default (224 for imagenet2012).
  c.data.image_size = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "convnet"
  c.model.width = 64
  c.model.depth = 3
  c.model.norm = "instance"
  c.model.pool = "avg"
  # Where the classifier comes from (dsv_jax.experiment.sources): "train"
  # (the train stage), "torchvision:resnet50[:WEIGHTS]" (pretrained,
  # converted once into source_cache_dir; "" = ~/.cache/dsv_jax/pretrained)
  # or "module:function" (your factory of (apply_fn, params, info)).
  c.model.source = "train"
  c.model.source_cache_dir = ""


def _training(c: ml_collections.ConfigDict) -> None:
  """The classifier's training, and its finishing phase."""
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 128
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 5e-3
  # "cosine" (decay to 0) or "constant"; see dsv_jax.train.make_optimizer.
  c.train.lr_schedule = "cosine"
  c.train.flip = False
  c.train.max_shift = 1
  # Finishing phase (train.finish_full_batch): full-batch L-BFGS on the
  # un-augmented training objective over the leaves a lambda can represent,
  # until ||grad F|| / (wd ||theta||) -- the residual of the uniform
  # lambda = 1 / (N wd) -- is below finish_tol. DeepKKT assumes theta* is
  # stationary; minibatch Adam leaves it far from that (docs/method.md,
  # choices: finishing phase).
  # 0 steps: off.
  c.train.finish_steps = 100
  c.train.finish_tol = 0.05
  c.train.eval_every = 250
  c.train.log_every = 100
  c.train.ckpt_every = 250


def _synthesis(c: ml_collections.ConfigDict) -> None:
  """The DeepKKT objective of synthesis and the synthesis stage."""
  # The DeepKKT objective of synthesis (the paper's Eq. 9):
  #   L_kkt = beta_stationarity * L_stat + beta_primal * L_primal
  #   L = L_kkt(X) + eta * L_kkt(A(X)) + beta_tv * L_tv(X) + beta_norm * L_norm
  c.kkt = ml_collections.ConfigDict()
  c.kkt.eta = 5.0  # The paper's weight of the augmented term.
  c.kkt.beta_primal = 1.0  # beta1; paper-silent for these datasets (OURS).
  # 1 in the paper; 0 = the primal-only (cross-entropy) ablation.
  c.kkt.beta_stationarity = 1.0
  c.kkt.beta_tv = 0.0  # beta2 of synthesize.tv_prior (squared-L2 TV).
  c.kkt.beta_norm = 0.0  # beta3 of synthesize.norm_prior (mean x^2).
  # What the norm prior pulls towards: "mean" (the mean image) or "min"
  # (pixel_min: the dark background of digit and clothing images).
  c.kkt.norm_center = "mean"
  # The library's default (kkt.DEFAULT_DISTANCE, "cosine"; why: there).
  c.kkt.distance = kkt.DEFAULT_DISTANCE
  c.kkt.gated = True  # Eq. 7's gated cross-entropy.
  c.kkt.method = "fast"  # kkt.METHODS: custom-VJP derivative.
  c.kkt.chunk_size = 0  # Candidates per backward pass; 0 = all at once.

  c.synth = ml_collections.ConfigDict()
  # Classifier to invert: a workdir or classifier/ dir; "" = this workdir.
  c.synth.classifier = ""
  c.synth.init = "noise"  # noise (N(0, I)), real (k-shot), other (0-shot).
  c.synth.noise_scale = 1.0  # Std of the noise init (normalised space).
  # Source of init="other" (0-shot), resized to the data's shape; each
  # dataset's config names one that is not itself.
  c.synth.other_dataset = "fashion_mnist"
  c.synth.other_data_dir = ""
  c.synth.num_per_class = 10
  # Classes to synthesise (and edit): "" = all, or a comma-separated list of
  # indices or class names (ImageNet: WordNet ids or names, "slug,goldfish").
  c.synth.classes = ""
  # Side of the synthesised images; 0 = the classifier's own. A globally
  # pooled network (the ResNets) takes any size: a small one is a cheap
  # smoke run of an ImageNet model.
  c.synth.image_size = 0
  # Low-resolution start (0: off): lowres_steps steps on lowres_size images,
  # upsampled (bilinear) before the classifier, then synth.steps at full
  # size from their upsampling. Coarse structure first, as in
  # multi-resolution feature visualisation; multipliers restart at full size.
  c.synth.lowres_size = 0
  c.synth.lowres_steps = 0
  # > 0: soft targets (1 - delta) y_c + delta y_{c+1} (labels as latents).
  c.synth.delta = 0.0
  c.synth.steps = 300
  c.synth.optimizer = "adam"  # For x and lambda, each with its own lr.
  c.synth.lr_x = 0.01
  c.synth.lr_lambda = 0.05
  # Candidates that start from images (init real or other; edit and
  # interpolate too) run their own recipe: they start on the data and
  # settle early, and the priors and large steps that help noise pull them
  # off it (measured on digits; benchmarks/README.md, synth_sweep).
  # 0 = synth.steps / synth.lr_x; image_priors False: kkt.beta_tv and
  # kkt.beta_norm apply to noise init only. common.synthesis_recipe.
  c.synth.image_steps = 0
  c.synth.image_lr_x = 0.0
  c.synth.image_priors = False
  # Candidates from another data set (init other, 0-shot) start on data,
  # but not this data: they have as far to travel as noise, so they have a
  # recipe of their own. 0 = synth.image_steps / synth.image_lr_x;
  # other_priors: whether kkt.beta_tv and kkt.beta_norm apply.
  c.synth.other_steps = 0
  c.synth.other_lr_x = 0.0
  c.synth.other_priors = False
  # Dual feasibility: "mask" (paper: drop lambda < 0) or "softplus"
  # (lambda = softplus(s): nobody is dropped); softplus measured better.
  c.synth.dual = "softplus"
  c.synth.lambda_low = 0.5  # Initial lambdas ~ U[low, high].
  c.synth.lambda_high = 1.0
  # The manifold augmentation A (augment.make_augment); the paper's strengths.
  c.synth.aug_translate = 0.125
  c.synth.aug_crop = 0.2
  c.synth.aug_flip = 0.5
  c.synth.aug_cutout = 0.15
  c.synth.aug_noise = 0.01
  c.synth.log_every = 25
  c.synth.ckpt_every = 100
  c.synth.num_devices = 0  # Devices of the `data` mesh; 0 = all local.


def _selection(c: ml_collections.ConfigDict) -> None:
  """The select stage."""
  # Selection (dsv_jax.select): fit lambda >= 0 over
  # the whole training set, rank by contribution lambda_i ||p_i - y_i||.
  c.select = ml_collections.ConfigDict()
  # Classifier to explain: a workdir or classifier/ dir; "" = this workdir.
  c.select.classifier = ""
  # The library's validated recipe (dsv_jax.select.DEFAULT_*; measured:
  # docs/method.md, choices table): stationarity distance, weight of the
  # complementary-slackness (contribution) term (0 = plain fit), lambda
  # init, ranking score. One source of truth: read, not restated.
  c.select.distance = select.DEFAULT_DISTANCE
  c.select.slackness = select.DEFAULT_SLACKNESS
  c.select.init = select.DEFAULT_INIT
  c.select.score = select.DEFAULT_SCORE
  # Parameters to represent (select.WRT): "auto" leaves out those no lambda
  # can represent (select.represented_leaves), "all" keeps every leaf.
  c.select.wrt = "auto"
  # The iteration budget of the stage (each iteration is about 1.5-1.8x
  # a forward+backward pass over the training set); the library's own
  # default (select.DEFAULT_MAX_ITERS) is for small problems.
  c.select.max_iters = 100
  c.select.tol = 1e-4  # Relative lambda change per iteration.
  c.select.chunk_size = 1024  # Samples per pass (memory O(chunk)).
  c.select.l1_smoothing = 0.05  # Huber width of l1_mean, x mean|theta*|.
  c.select.num_per_class = 10  # Top-k per class saved as the DSV set.
  c.select.num_random_per_class = 50  # Random comparison set per class.
  c.select.num_devices = 0  # Devices of the `data` mesh; 0 = all local.
  c.select.log_every = 5
  c.select.ckpt_every = 10


def _evaluation(c: ml_collections.ConfigDict) -> None:
  """Retraining, the baseline, editing, interpolation and the report."""
  # Retraining K fresh models on each DSV set and on random real images with
  # the same per-class counts (experiment.stages.retrain): one recipe for
  # every row. The paper's retraining optimiser: Adam, lr 1e-4.
  c.retrain = ml_collections.ConfigDict()
  c.retrain.num_models = 5  # K seeds, trained together in one jitted step.
  # The paper's optimiser over 1000 full-batch steps; weight decay made no
  # measurable difference, so the classifier's is kept. The packaged data
  # sets override it with the validated recipe (docs/method.md, choices:
  # retraining recipe).
  c.retrain.steps = 1000
  c.retrain.learning_rate = 1e-4
  # >= the set's size means full batch: every set up to 25 per class of 10
  # classes trains full-batch, as few-shot distillation evaluations do.
  c.retrain.batch_size = 256
  c.retrain.weight_decay = 5e-3  # Coupled L2, as the classifier's recipe.
  # Augmentation of the retraining batches (augment.flip_and_translate);
  # datasets trained with flips should set flip too.
  c.retrain.flip = False
  c.retrain.max_shift = 1
  c.retrain.seed_offset = 1000  # Retraining seed = seed + seed_offset.
  # Train on the soft targets of a soft-target set (else on their argmax).
  c.retrain.soft_targets = False
  # "test" for reported numbers; "validation" for tuning the recipe.
  c.retrain.eval_split = "test"
  # "auto": "unroll" on CPU (the faster there, see retrain.py), "vmap" on
  # GPU/TPU, where the models split over devices.
  c.retrain.vectorize = "auto"
  c.retrain.log_every = 250

  # The KKT reconstruction baseline of Haim et al. 2022 / Buzaglo et al.
  # 2023 (dsv_jax.baseline): squared-L2 stationarity with the margin, a
  # lambda >= lambda_min hinge, pixel clipping; from the synthesize stage's
  # initial candidates. The lambda settings are in Haim et al.'s units
  # (shares of the multipliers' total; see dsv_jax.baseline).
  c.baseline = ml_collections.ConfigDict()
  c.baseline.steps = 300
  c.baseline.lr_x = 0.01
  c.baseline.lr_lambda = 0.05
  c.baseline.lambda_min = 0.05
  c.baseline.beta_lambda = 1.0  # Weight of the lambda_min hinge.
  c.baseline.lambda_low = 0.5  # Initial lambdas ~ U[low, high].
  c.baseline.lambda_high = 1.0
  c.baseline.log_every = 25
  c.baseline.ckpt_every = 100

  c.edit = ml_collections.ConfigDict()
  c.edit.shift = 1  # One real image per class c, edited to class c + shift.
  c.edit.steps = 200
  # Edits as "source->target" class pairs, by index or name ("slug->head
  # cabbage,1->3"); "" = every class of synth.classes to class + shift.
  c.edit.pairs = ""

  c.interpolate = ml_collections.ConfigDict()
  c.interpolate.class_a = 0
  c.interpolate.class_b = 1
  c.interpolate.num_deltas = 6  # delta = linspace(0, 1, num_deltas).
  c.interpolate.steps = 200

  # The report stage (dsv_jax.report): the paper's experiments.
  c.report = ml_collections.ConfigDict()
  # Images per class of the few-shot table and of the coreset table.
  c.report.ipc = (1, 10)
  c.report.coreset_ipc = (1, 10, 50)
  # EL2N baseline of the coreset table: models and training steps (of the
  # classifier's recipe) it is scored after.
  c.report.el2n_models = 5
  c.report.el2n_steps = 100
  # Real candidates of the paper's entropy protocol (boundary section).
  c.report.protocol_candidates = 100
  # The few-shot table shows 0-shot DSVs from both synth.other_dataset (the
  # paper's protocol) and noise. The boundary and ablation sections run one
  # from-scratch synthesis at detail_ipc per class (must be in ipc, so the
  # few-shot sub-runs are reused) from zero_shot_init: "noise" (the hard
  # case, where stationarity has to make data) or "other".
  c.report.zero_shot_init = "noise"
  c.report.detail_ipc = 10
  # Include the KKT-reconstruction baseline rows (dsv_jax.baseline).
  c.report.baseline = True
  # A smoke run (the tiny variant): the report says its numbers test the
  # plumbing, not the method.
  c.report.smoke = False
  # Decision criteria: test images per class, added norm / image norm.
  c.report.flip_images = 20
  c.report.flip_ratios = (0.1, 0.25, 0.5)
  # Seed offset of the independent classifier of the loss ablation.
  c.report.independent_seed_offset = 1
  # The candidate-count regime (experiment.report.regime): noise-init
  # synthesis at these candidates per class (0: twice the training samples
  # per class); () leaves the section out.
  c.report.candidate_counts = ()


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to seconds of work for smoke tests."""
  c.report.smoke = True
  c.data.max_train = 200
  c.model.width = 8
  c.model.depth = 2
  c.train.steps = 6
  c.train.finish_steps = 5
  c.train.batch_size = 32
  c.train.eval_every = 3
  c.train.log_every = 2
  c.train.ckpt_every = 3
  c.synth.num_per_class = 2
  c.synth.steps = 6
  # Image inits, real or other, run synth.steps too, at the real-image
  # lr; 0-shot falls back to the real-image recipe.
  c.synth.image_steps = c.synth.other_steps = 0
  c.synth.other_lr_x = 0.0
  c.synth.other_priors = False
  c.synth.log_every = 2
  c.synth.ckpt_every = 3
  c.select.max_iters = 6
  c.select.chunk_size = 64
  c.select.num_per_class = 2
  c.select.num_random_per_class = 2
  c.select.log_every = 2
  c.select.ckpt_every = 3
  c.retrain.num_models = 2
  c.retrain.steps = 4
  c.retrain.log_every = 2
  c.baseline.steps = 4
  # The 0-shot source that is always offline (the sklearn-bundled digits).
  c.synth.other_dataset = "digits"
  c.baseline.log_every = 2
  c.baseline.ckpt_every = 2
  c.edit.steps = 4
  c.interpolate.steps = 4
  c.interpolate.num_deltas = 3
  c.report.ipc = (1,)
  c.report.detail_ipc = 1
  c.report.coreset_ipc = (1,)
  c.report.el2n_models = 2
  c.report.el2n_steps = 3
  c.report.protocol_candidates = 20
  c.report.flip_images = 2
  c.report.flip_ratios = (0.5,)
  # The synthesize stage's own candidates: the regime section's plumbing,
  # without another synthesis.
  c.report.candidate_counts = (c.synth.num_per_class,)
  return c
