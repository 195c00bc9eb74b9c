"""SSIM between images, and each query's best-matching reference.

SSIM is that of Wang et al. 2004 ("Image quality assessment: from error
visibility to structural similarity", IEEE TIP), per window position

  SSIM = (2 mu_a mu_b + C1) (2 s_ab + C2)
         / ((mu_a^2 + mu_b^2 + C1) (s_a^2 + s_b^2 + C2))

with ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` (``L`` the data range, 1 for
images in [0, 1]), local means, variances and covariance weighted by a
normalised Gaussian window of sigma 1.5 (population moments, as Wang et
al.), averaged over the window positions that lie wholly inside the image
("valid"; no padding) and over the channels.

The window: Wang et al. use 11x11 (sigma 1.5). It does not fit an 8x8
image, so the default here is a 7x7 window of the same sigma (the Gaussian
cut at 2 sigma and renormalised): it fits images of 7x7 and larger and
gives 2x2 positions on 8x8 digits, 22x22 on 28x28 (Fashion-)MNIST. Pass
``win_size=11`` for Wang et al.'s exact filter on larger images; then the
value equals scikit-image's ``structural_similarity(a, b,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1, channel_axis=-1)``.

`best_match` scores every query against every reference: the covariance
term is the only one that pairs images, and per window position it is a
dot product of window-weighted patches, so all pairs come from one batched
matrix product per block of queries.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_K1, _K2 = 0.01, 0.03


def gaussian_window(win_size: int, sigma: float) -> np.ndarray:
  """``[win_size * win_size]`` normalised 2-D Gaussian weights (row-major)."""
  if win_size < 1 or win_size % 2 == 0:
    raise ValueError(f"win_size must be a positive odd int, got {win_size}.")
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}.")
  r = np.arange(win_size) - win_size // 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  w = np.outer(g, g)
  return (w / w.sum()).reshape(-1)


def _patch_index(height: int, width: int, win_size: int) -> np.ndarray:
  """``[P, K]`` flat pixel indices of each valid window's K pixels."""
  if height < win_size or width < win_size:
    raise ValueError(
      f"images of {height}x{width} are smaller than the {win_size}x"
      f"{win_size} SSIM window; pass a smaller win_size."
    )
  rows = np.arange(height - win_size + 1)
  cols = np.arange(width - win_size + 1)
  dr, dc = np.divmod(np.arange(win_size * win_size), win_size)
  top = (rows[:, None] * width + cols[None, :]).reshape(-1)
  return top[:, None] + (dr * width + dc)[None, :]


def _check_images(name: str, x) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 3:
    raise ValueError(f"{name} must be [..., H, W, C] images, got {x.shape}.")
  return x


def _patches(x: jax.Array, index: np.ndarray) -> jax.Array:
  """``[..., H, W, C]`` -> ``[..., P*C, K]`` window patches, per channel."""
  *lead, h, w, c = x.shape
  flat = jnp.moveaxis(x.reshape(*lead, h * w, c), -1, -2)  # [..., C, HW]
  p = flat[..., index]  # [..., C, P, K]
  return p.reshape(*lead, c * index.shape[0], index.shape[1])


def _moments(p: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Window means and variances of patches ``[..., Q, K]``."""
  mu = p @ w
  return mu, (p * p) @ w - mu * mu


def _ssim_from_moments(mu_a, var_a, mu_b, var_b, cov, c1, c2):
  num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
  den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
  return jnp.mean(num / den, axis=-1)


def _constants(data_range: float) -> tuple[float, float]:
  if not data_range > 0:
    raise ValueError(f"data_range must be > 0, got {data_range}.")
  return (_K1 * data_range) ** 2, (_K2 * data_range) ** 2


def ssim(
  a,
  b,
  *,
  win_size: int = 7,
  sigma: float = 1.5,
  data_range: float = 1.0,
) -> jax.Array:
  """SSIM of images ``a`` and ``b``, ``[..., H, W, C]`` -> ``[...]``.

  Leading dimensions broadcast; channels are averaged. See the module
  docstring for the window (default Gaussian 7x7, sigma 1.5).
  """
  a, b = _check_images("a", a), _check_images("b", b)
  if a.shape[-3:] != b.shape[-3:]:
    raise ValueError(
      f"a and b must be images of one shape, got {a.shape} and {b.shape}."
    )
  c1, c2 = _constants(data_range)
  index = _patch_index(a.shape[-3], a.shape[-2], win_size)
  w = jnp.asarray(gaussian_window(win_size, sigma), jnp.float32)
  pa, pb = _patches(a, index), _patches(b, index)
  mu_a, var_a = _moments(pa, w)
  mu_b, var_b = _moments(pb, w)
  cov = (pa * pb) @ w - mu_a * mu_b
  return _ssim_from_moments(mu_a, var_a, mu_b, var_b, cov, c1, c2)


@functools.partial(jax.jit, static_argnames=("c1", "c2"))
def _block_best(qp, q_mu, q_var, rp, r_mu, r_var, w, *, c1, c2):
  """Best reference for a block of queries: ``(index, ssim)`` ``[B]``."""
  # E_w[a b] per position: sum_k w_k a_k b_k, one matmul per position.
  exy = jnp.einsum(
    "qpk,rpk->qrp", qp * w, rp, precision=jax.lax.Precision.HIGHEST
  )
  cov = exy - q_mu[:, None, :] * r_mu[None, :, :]
  s = _ssim_from_moments(
    q_mu[:, None, :],
    q_var[:, None, :],
    r_mu[None, :, :],
    r_var[None, :, :],
    cov,
    c1,
    c2,
  )  # [B, R]
  best = jnp.argmax(s, axis=1)
  return best, jnp.take_along_axis(s, best[:, None], 1)[:, 0]


def best_match(
  queries,
  references,
  *,
  win_size: int = 7,
  sigma: float = 1.5,
  data_range: float = 1.0,
  block_elements: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
  """Each query's most similar reference by `ssim`.

  Args:
    queries: ``[Q, H, W, C]`` images.
    references: ``[R, H, W, C]`` images (R >= 1).
    win_size, sigma, data_range: as `ssim`.
    block_elements: queries are scored in blocks of at most this many
      ``query x reference x window`` SSIM values (memory, not results).

  Returns:
    ``(index int[Q], ssim float[Q])``: the argmax reference of each query
    (the first on ties) and its SSIM, as numpy arrays.
  """
  q = _check_images("queries", queries)
  r = _check_images("references", references)
  if q.ndim != 4 or r.ndim != 4 or q.shape[1:] != r.shape[1:]:
    raise ValueError(
      "queries and references must be [N, H, W, C] of one image shape, "
      f"got {q.shape} and {r.shape}."
    )
  if r.shape[0] == 0:
    raise ValueError("references is empty.")
  c1, c2 = _constants(data_range)
  index = _patch_index(q.shape[1], q.shape[2], win_size)
  w = jnp.asarray(gaussian_window(win_size, sigma), jnp.float32)
  rp = _patches(r, index)
  r_mu, r_var = _moments(rp, w)
  per_query = r.shape[0] * rp.shape[1]
  block = max(1, min(q.shape[0], block_elements // per_query))
  n = q.shape[0]
  # Pad the queries to whole blocks: one compiled block shape.
  q = jnp.pad(q, [(0, -n % block), (0, 0), (0, 0), (0, 0)])
  idx, val = [], []
  for start in range(0, q.shape[0], block):
    qp = _patches(q[start : start + block], index)
    q_mu, q_var = _moments(qp, w)
    i, s = _block_best(qp, q_mu, q_var, rp, r_mu, r_var, w, c1=c1, c2=c2)
    idx.append(np.asarray(i))
    val.append(np.asarray(s))
  if not idx:
    return np.zeros((0,), np.int32), np.zeros((0,), np.float32)
  return np.concatenate(idx)[:n].astype(np.int32), np.concatenate(val)[:n]


__all__ = ["best_match", "gaussian_window", "ssim"]
