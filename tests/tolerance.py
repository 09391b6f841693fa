"""Float tolerances derived from the computation, never from one machine's result.

The rule (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5): a sum of
n terms computed in floating point, in any order, is within about n * u * sum|terms| of the
exact sum, where u is the unit roundoff (2^-24 in float32, 2^-53 in float64). The order is what
changes from one CPU to another (vector width, XLA's partitioning over threads or a device
mesh), so two orders of the same sum differ by at most twice that.
"""

import numpy as np


def unit_roundoff(dtype=np.float32) -> float:
  return float(np.finfo(dtype).eps) / 2


def sum_tolerance(n, magnitude, dtype=np.float32):
  """Two orders of a sum of n terms of magnitude at most `magnitude`."""
  return 2.0 * np.asarray(n, np.float64) * magnitude * unit_roundoff(dtype)


def logit_bound(params, output_weight_VxD) -> float:
  """|logit| <= ||h|| ||w_v||: the final RMSNorm's output has norm sqrt(D) * max|scale| at
  most (x / rms(x) has norm sqrt(D) exactly)."""
  scale = np.abs(np.asarray(params["final_norm"]["scale"], np.float64)).max()
  w = np.asarray(output_weight_VxD, np.float64)
  return float(np.sqrt(w.shape[1]) * scale * np.linalg.norm(w, axis=1).max())


def chain_length(cfg, row_len: int) -> int:
  """Terms accumulated on the way from a token to one log-prob: per layer the attention's
  scores and values (a row's keys), its projections and the MLP's two products (hidden and
  ffn widths) and the norm; then the output product (D) and the log-sum-exp (V)."""
  d, f = cfg.hidden_size, cfg.ffn_hidden_size
  return cfg.num_layers * (2 * row_len + 5 * d + f) + d + cfg.vocab_size


def logp_tolerance(counts, cfg, params, output_weight_VxD, row_len, dtype=np.float32):
  """Two layouts of the same per-sequence log-prob sums (`counts` response tokens each) agree
  to this: each token's log-prob z_t - lse(z) is good to chain * u relative to the logits'
  scale (both terms at most |z| + log V), and a sum of `counts` of them adds up to that."""
  z = logit_bound(params, output_weight_VxD) + np.log(cfg.vocab_size)
  per_token = sum_tolerance(chain_length(cfg, row_len), 2 * z, dtype)
  return np.asarray(counts, np.float64) * per_token
