/**
 * Mixed-rank LoRA algebra: one module's update, stacking updates of different
 * ranks, and truncating a low-rank product back to a given rank.
 *
 * A LoRA module has A of shape [r, in] and B of shape [out, r] (row-major, the
 * PEFT layout of lora_A.weight / lora_B.weight); its weight update is
 * s * B @ A with scaling s = lora_alpha / r.
 *
 * - `stackLora` is FLoRA's aggregation (Wang et al. 2024, "FLoRA: Federated
 *   Fine-Tuning Large Language Models with Heterogeneous Low-Rank
 *   Adaptations"): the weighted sum of products is itself a product of
 *   stacked factors, exactly, with rank sum r_k.
 * - `truncateLowRank` is FlexLoRA's redistribution step (Bai et al. 2024,
 *   "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
 *   and Client Resources"): the best rank-k approximation (Eckart-Young) of
 *   s * B @ A, computed from a QR of each factor and an SVD of the small
 *   r x r core, never forming the dense out x in matrix.
 *
 * Pure functions, no state. QR and SVD come from ml-matrix.
 */
import { Matrix, QrDecomposition, SingularValueDecomposition } from 'ml-matrix';

/** Factors of one LoRA module: A [r, in], B [out, r], row-major. */
export interface LoraFactors {
  A: Float32Array;
  B: Float32Array;
  r: number;
}

/** One site's module for `stackLora`: its factors, its aggregation weight and its scaling alpha / r. */
export interface LoraPart extends LoraFactors {
  weight: number;
  scale: number;
}

export interface TruncatedLora extends LoraFactors {
  /** Every singular value of scale * B @ A (min(r, in, out) of them), descending. */
  singularValues: Float64Array;
  /** Frobenius norm of what the truncation discarded: sqrt(sum of the dropped singular values squared). */
  discardedNorm: number;
}

function checkDim(fn: string, name: string, v: number): void {
  if (!Number.isInteger(v) || v < 1) throw new Error(`${fn}: ${name} must be an integer >= 1, got ${v}`);
}

function checkFactors(fn: string, where: string, A: Float32Array, B: Float32Array, r: number, inDim: number, outDim: number): void {
  checkDim(fn, `${where}r`, r);
  if (A.length !== r * inDim) {
    throw new Error(`${fn}: ${where}A has ${A.length} elements but [r, in] = [${r}, ${inDim}] needs ${r * inDim}; A is lora_A.weight, shape [r, in_features]`);
  }
  if (B.length !== outDim * r) {
    throw new Error(`${fn}: ${where}B has ${B.length} elements but [out, r] = [${outDim}, ${r}] needs ${outDim * r}; B is lora_B.weight, shape [out_features, r]`);
  }
  for (const [name, v] of [['A', A], ['B', B]] as const) {
    for (let j = 0; j < v.length; j++) {
      const x = v[j]!;
      if (x - x !== 0) throw new Error(`${fn}: ${where}${name}[${j}] is ${x}; reject non-finite adapters before aggregating`);
    }
  }
}

function checkScale(fn: string, name: string, v: number, positive: boolean): void {
  if (!Number.isFinite(v) || (positive && v <= 0)) {
    throw new Error(`${fn}: ${name} must be a finite number${positive ? ' > 0' : ''} (lora_alpha / r), got ${v}`);
  }
}

/** The dense update scale * B @ A, [out, in] row-major, in float64. */
export function loraProduct(A: Float32Array, B: Float32Array, r: number, inDim: number, outDim: number, scale: number): Float64Array {
  checkDim('loraProduct', 'inDim', inDim);
  checkDim('loraProduct', 'outDim', outDim);
  checkFactors('loraProduct', '', A, B, r, inDim, outDim);
  checkScale('loraProduct', 'scale', scale, false);
  const M = new Float64Array(outDim * inDim);
  for (let o = 0; o < outDim; o++) {
    const row = o * inDim;
    for (let j = 0; j < r; j++) {
      const b = scale * B[o * r + j]!;
      if (b === 0) continue;
      const a = j * inDim;
      for (let i = 0; i < inDim; i++) M[row + i] += b * A[a + i]!;
    }
  }
  return M;
}

/**
 * FLoRA stacking. A_stack is the rows of every A_k in order; B_stack is the
 * columns of every (weight_k * scale_k / targetScale) * B_k in the same
 * order. Then targetScale * B_stack @ A_stack = sum_k weight_k * scale_k *
 * B_k @ A_k (up to float32 rounding of the scaled B). The weights are used as
 * given (normalise them first for a weighted mean).
 */
export function stackLora(parts: readonly LoraPart[], inDim: number, outDim: number, targetScale: number): LoraFactors {
  if (parts.length === 0) throw new Error('stackLora: parts is empty; pass at least one site update');
  checkDim('stackLora', 'inDim', inDim);
  checkDim('stackLora', 'outDim', outDim);
  checkScale('stackLora', 'targetScale', targetScale, true);
  let R = 0;
  parts.forEach((p, k) => {
    checkFactors('stackLora', `parts[${k}].`, p.A, p.B, p.r, inDim, outDim);
    checkScale('stackLora', `parts[${k}].scale`, p.scale, false);
    if (!Number.isFinite(p.weight) || p.weight < 0) throw new Error(`stackLora: parts[${k}].weight is ${p.weight}; weights must be finite and >= 0`);
    R += p.r;
  });
  const A = new Float32Array(R * inDim);
  const B = new Float32Array(outDim * R);
  let offset = 0;
  for (const p of parts) {
    A.set(p.A, offset * inDim);
    const c = (p.weight * p.scale) / targetScale;
    for (let o = 0; o < outDim; o++) {
      const src = o * p.r;
      const dst = o * R + offset;
      for (let j = 0; j < p.r; j++) B[dst + j] = c * p.B[src + j]!;
    }
    offset += p.r;
  }
  return { A, B, r: R };
}

/**
 * Thin QR of a rows x cols matrix: Q (rows x k) with orthonormal columns and
 * R (k x cols), k = min(rows, cols). ml-matrix's Householder QR needs
 * rows >= cols; a wide matrix is its own R with Q = I.
 */
function thinQr(M: Matrix): { Q: Matrix; R: Matrix } {
  if (M.rows < M.columns) return { Q: Matrix.eye(M.rows, M.rows), R: M };
  const qr = new QrDecomposition(M);
  return { Q: qr.orthogonalMatrix, R: qr.upperTriangularMatrix };
}

/**
 * The best rank-`rank` approximation, in Frobenius norm, of scale * B @ A,
 * as factors A' [rank, in], B' [out, rank] with targetScale * B' @ A' equal to
 * it. With B = Q_B R_B and A^T = Q_A R_A, scale * B @ A = Q_B (scale * R_B
 * R_A^T) Q_A^T; the SVD U' S V'^T of that small core gives the SVD of the
 * product with U = Q_B U', V = Q_A V'. Then B' = U_k sqrt(S_k / targetScale)
 * and A' = sqrt(S_k / targetScale) V_k^T. When rank exceeds the number of
 * singular values, the extra rows of A' and columns of B' are zero and the
 * product is reproduced exactly.
 */
export function truncateLowRank(
  A: Float32Array,
  B: Float32Array,
  r: number,
  inDim: number,
  outDim: number,
  scale: number,
  rank: number,
  targetScale: number,
): TruncatedLora {
  checkDim('truncateLowRank', 'inDim', inDim);
  checkDim('truncateLowRank', 'outDim', outDim);
  checkFactors('truncateLowRank', '', A, B, r, inDim, outDim);
  checkScale('truncateLowRank', 'scale', scale, false);
  checkDim('truncateLowRank', 'rank', rank);
  checkScale('truncateLowRank', 'targetScale', targetScale, true);

  const Bm = Matrix.from1DArray(outDim, r, B);
  const At = Matrix.from1DArray(r, inDim, A).transpose();
  const qb = thinQr(Bm);
  const qa = thinQr(At);
  const core = qb.R.mmul(qa.R.transpose()).mul(scale); // kB x kA
  // ml-matrix's SVD is for rows >= columns; a wide core is decomposed through its transpose.
  const wide = core.rows < core.columns;
  const svd = new SingularValueDecomposition(wide ? core.transpose() : core);
  const Uc = wide ? svd.rightSingularVectors : svd.leftSingularVectors; // kB x n
  const Vc = wide ? svd.leftSingularVectors : svd.rightSingularVectors; // kA x n
  const s = svd.diagonal;
  const nS = Math.min(core.rows, core.columns);
  const singularValues = Float64Array.from(s.slice(0, nS));
  const U = qb.Q.mmul(Uc.subMatrix(0, Uc.rows - 1, 0, nS - 1)); // out x nS
  const V = qa.Q.mmul(Vc.subMatrix(0, Vc.rows - 1, 0, nS - 1)); // in x nS

  const keep = Math.min(rank, nS);
  const outA = new Float32Array(rank * inDim);
  const outB = new Float32Array(outDim * rank);
  for (let t = 0; t < keep; t++) {
    const g = Math.sqrt(singularValues[t]! / targetScale);
    for (let i = 0; i < inDim; i++) outA[t * inDim + i] = g * V.get(i, t);
    for (let o = 0; o < outDim; o++) outB[o * rank + t] = g * U.get(o, t);
  }
  let discarded = 0;
  for (let t = keep; t < nS; t++) discarded += singularValues[t]! * singularValues[t]!;
  return { A: outA, B: outB, r: rank, singularValues, discardedNorm: Math.sqrt(discarded) };
}
