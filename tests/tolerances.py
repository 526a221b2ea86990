"""Tolerances shared by the tests, each derived from float32 (or float64) arithmetic, not from one
machine's result. A comparison of two paths that are bit-identical by construction (the same
executable on the same inputs, the same numpy expression on the same numbers) asserts equality
instead; every other comparison uses one of these bounds or states its own next to it.

The model. A float32 rounding moves a value by at most U = 2**-24 relative (machine epsilon 2**-23
is 2U; float64: 2**-53). A sum or dot product of k terms computed in some order errs by at most
gamma_k = k U / (1 - k U) times sum |terms| (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 3.4); with rounding errors of independent sign the partial sums' errors
add as a random walk (Higham & Mary, SIAM J. Sci. Comput. 2019), about sqrt(k / 2) U of the
result for terms of random sign (|result| ~ sqrt(k) rms term, the k partial sums ~ sqrt(j) rms).
Two implementations that sum in different orders (torch vs XLA, a batched vs an unbatched XLA
program, another CPU's kernels) differ by at most the sum of their two errors: sqrt(2) times one.
LAMBDA = 5 covers the random walk's tail over the largest of up to 1e5 compared entries (the
maximum of n Gaussian errors is about sqrt(2 ln n) = 4.8 standard deviations for n = 1e5).
"""

from __future__ import annotations

import math

U = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53  # float64 unit roundoff
LAMBDA = 5.0

# Logits of the test decoders (fixtures_models: hidden 64, MLP 128, 2 layers; the suite's width
# 32) from two float32 implementations, as a fraction of the largest |logit|. Each of the
# STAGES chained matmul / reduction stages (per layer q, k, v, scores, probs @ v, o, gate/up,
# down; then the LM head) has inner width <= WIDTH and rounds by ~sqrt(WIDTH / 2) U of its output;
# norms and softmax are Lipschitz-1 on relative errors, so the stages' errors add in quadrature:
# LAMBDA * sqrt(2) * sqrt(STAGES) * sqrt(WIDTH / 2) * U = 1.4e-5 -> 1.5e-5.
WIDTH, STAGES = 128, 2 * 8 + 1
FORWARD_RTOL = 1.5e-5
assert LAMBDA * math.sqrt(2 * STAGES) * math.sqrt(WIDTH / 2) * U <= FORWARD_RTOL

# A task loss (mean cross-entropy over M >= 10 response tokens per compared value, a task's or a
# cluster's examples; ~ log V ~ 6 for the random tiny models) from two float32 implementations,
# relative. Per token, lse(z) - z_y moves by a softmax-weighted mean of the logit errors minus
# one of them: <= 2 sigma, sigma the per-logit error (FORWARD_RTOL / LAMBDA = 2.8e-6 of an rms
# |logit| <= 3: 8.3e-6 absolute); over M tokens the independent errors average: 2 sigma /
# sqrt(M) = 5.3e-6 absolute, 8.8e-7 of the loss; LAMBDA and a further 2 for correlated tokens:
# 8.8e-6 -> 1e-5. Sums of positive losses (objectives, per-cluster sums, means) keep the same
# relative bound.
LOSS_RTOL = 1e-5

# A merged LoRA delta (scaling * B @ A) from two float32 implementations of the same merge,
# relative to its largest |entry|: each entry sums <= N = 5 weighted members and r <= 16 rank
# products, gamma_{N + r + 2} ~ 23 U = 1.4e-6 of sum |terms|, which is <= 4 max |delta| for the
# fixtures' Gaussian factors (sum |b_i a_i| / |sum b_i a_i| ~ sqrt(r)); both sides: 1e-5.
MERGE_RTOL = 1e-5

# A delta written through a float32 SVD truncated to rank r (ties_delta, iso_c, knots, an output
# rank), relative to its largest |entry|: LAPACK's SVD is backward stable, ||E|| <= p(n) U sigma_1
# with p(n) ~ n = d_in <= 64 for one-sided Jacobi/divide-and-conquer in practice (4e-6); the kept
# rank-r part moves by ||E|| sigma_1 / (sigma_r - sigma_{r+1}) (Wedin), a gap of >= 1/4 sigma_1
# for the fixtures' random deltas: 2e-5.
SVD_RTOL = 2e-5

# Scores in [0, 100] (ROUGE-L, chrF, SQuAD F1, their means) from two float64 implementations of the
# same rational formula: <= 50 operations, each <= U64 relative of a value <= 100: 50 * 100 * U64
# = 5.6e-13; 1e-9 is far inside one token's change of a score (>= 100 / 64 words ~ 1.6).
METRIC_ABS = 1e-9
