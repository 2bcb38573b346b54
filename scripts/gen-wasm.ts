/**
 * Generates coordinator/strategies/math/sum-kernels.ts: the WebAssembly (SIMD)
 * kernels of the coordinator's float64 running sums, from the WebAssembly text
 * below, assembled with wabt (a devDependency; only this script needs it). The
 * generated file holds the module's bytes, so fedtune needs no wasm toolchain at
 * run time; test/unit/wasm-stale.test.ts fails when it is not what this script
 * writes.
 *
 *   node bin/run-ts.js scripts/gen-wasm.ts [OUTPUT_ROOT]   (npm run wasm; default: the repository root)
 *
 * Kernels (byte offsets into the imported memory; n elements; every kernel
 * computes, lane by lane, exactly the float64 expression the JavaScript
 * fallback in sum.ts evaluates, in the same order, so both give identical bits):
 *   fold1..fold4(s, n, a, wa, [b, wb, ...])  s[j] = s[j] + (wa*a[j] + wb*b[j] + ...)
 *                                            (a, b, ... float32; s float64)
 *   scale(s, n, f, out)                      out[j] = float32(s[j] * f)
 *   absmax(a, n) -> f32                      the largest |a[j]| (a float32); NaN when a holds a
 *                                            NaN, 0 when n = 0 (sum.ts absMax, in one pass,
 *                                            compared as integer bits)
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import wabtInit from 'wabt';

const SRC = 'abcd';

/** The float64 term w_k * x_k[lane] of source k for the low (0, 1) or high (2, 3) float32 lanes of $xk. */
function term(k: number, half: 'lo' | 'hi'): string {
  const x = `(local.get $x${SRC[k]})`;
  const lanes = half === 'lo' ? x : `(i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 ${x} ${x})`;
  return `(f64x2.mul (f64x2.promote_low_f32x4 ${lanes}) (local.get $v${SRC[k]}))`;
}

/** Left-to-right sum of the terms, as JavaScript evaluates w_a*a + w_b*b + ... */
function chain(terms: string[]): string {
  return terms.slice(1).reduce((acc, t) => `(f64x2.add ${acc} ${t})`, terms[0]!);
}
function chainScalar(terms: string[]): string {
  return terms.slice(1).reduce((acc, t) => `(f64.add ${acc} ${t})`, terms[0]!);
}

function fold(k: number): string {
  const srcs = [...SRC.slice(0, k)];
  const params = srcs.map((c) => `(param $${c} i32) (param $w${c} f64)`).join(' ');
  const locals = srcs.map((c) => `(local $x${c} v128) (local $v${c} v128)`).join(' ');
  const splats = srcs.map((c) => `(local.set $v${c} (f64x2.splat (local.get $w${c})))`).join('\n    ');
  const loads = srcs.map((c) => `(local.set $x${c} (v128.load (i32.add (local.get $${c}) (local.get $p))))`).join('\n        ');
  const scalar = srcs.map((c) => `(f64.mul (f64.promote_f32 (f32.load (i32.add (local.get $${c}) (local.get $p)))) (local.get $w${c}))`);
  return `
  (func (export "fold${k}") (param $s i32) (param $n i32) ${params}
    (local $i i32) (local $n4 i32) (local $p i32) (local $q i32) ${locals}
    ${splats}
    (local.set $n4 (i32.and (local.get $n) (i32.const -4)))
    (block $done
      (loop $four
        (br_if $done (i32.ge_u (local.get $i) (local.get $n4)))
        (local.set $p (i32.shl (local.get $i) (i32.const 2)))
        (local.set $q (i32.add (local.get $s) (i32.shl (local.get $i) (i32.const 3))))
        ${loads}
        (v128.store (local.get $q) (f64x2.add (v128.load (local.get $q)) ${chain(srcs.map((_, j) => term(j, 'lo')))}))
        (v128.store offset=16 (local.get $q) (f64x2.add (v128.load offset=16 (local.get $q)) ${chain(srcs.map((_, j) => term(j, 'hi')))}))
        (local.set $i (i32.add (local.get $i) (i32.const 4)))
        (br $four)))
    (block $end
      (loop $one
        (br_if $end (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $p (i32.shl (local.get $i) (i32.const 2)))
        (local.set $q (i32.add (local.get $s) (i32.shl (local.get $i) (i32.const 3))))
        (f64.store (local.get $q) (f64.add (f64.load (local.get $q)) ${chainScalar(scalar)}))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $one))))`;
}

const scale = `
  (func (export "scale") (param $s i32) (param $n i32) (param $f f64) (param $out i32)
    (local $i i32) (local $n4 i32) (local $q i32) (local $vf v128)
    (local.set $vf (f64x2.splat (local.get $f)))
    (local.set $n4 (i32.and (local.get $n) (i32.const -4)))
    (block $done
      (loop $four
        (br_if $done (i32.ge_u (local.get $i) (local.get $n4)))
        (local.set $q (i32.add (local.get $s) (i32.shl (local.get $i) (i32.const 3))))
        (v128.store (i32.add (local.get $out) (i32.shl (local.get $i) (i32.const 2)))
          (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
            (f32x4.demote_f64x2_zero (f64x2.mul (v128.load (local.get $q)) (local.get $vf)))
            (f32x4.demote_f64x2_zero (f64x2.mul (v128.load offset=16 (local.get $q)) (local.get $vf)))))
        (local.set $i (i32.add (local.get $i) (i32.const 4)))
        (br $four)))
    (block $end
      (loop $one
        (br_if $end (i32.ge_u (local.get $i) (local.get $n)))
        (f32.store (i32.add (local.get $out) (i32.shl (local.get $i) (i32.const 2)))
          (f32.demote_f64 (f64.mul (f64.load (i32.add (local.get $s) (i32.shl (local.get $i) (i32.const 3)))) (local.get $f))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $one))))`;

// The largest |a[j]| compared as bits: with the sign bit cleared a float32's bits order as its
// magnitude does, +Infinity (0x7f800000) above every finite value and every NaN above +Infinity, so
// an unsigned integer maximum (one instruction, where a float maximum that propagates NaN is a
// sequence of several) finds it. Four running maxima, sixteen floats per iteration.
const absmax = `
  (func (export "absmax") (param $a i32) (param $n i32) (result f32)
    (local $i i32) (local $n16 i32) (local $p i32) (local $mask v128)
    (local $m0 v128) (local $m1 v128) (local $m2 v128) (local $m3 v128) (local $r i32) (local $x i32)
    (local.set $mask (i32x4.splat (i32.const 0x7fffffff)))
    (local.set $n16 (i32.and (local.get $n) (i32.const -16)))
    (block $done
      (loop $sixteen
        (br_if $done (i32.ge_u (local.get $i) (local.get $n16)))
        (local.set $p (i32.add (local.get $a) (i32.shl (local.get $i) (i32.const 2))))
        (local.set $m0 (i32x4.max_u (local.get $m0) (v128.and (v128.load (local.get $p)) (local.get $mask))))
        (local.set $m1 (i32x4.max_u (local.get $m1) (v128.and (v128.load offset=16 (local.get $p)) (local.get $mask))))
        (local.set $m2 (i32x4.max_u (local.get $m2) (v128.and (v128.load offset=32 (local.get $p)) (local.get $mask))))
        (local.set $m3 (i32x4.max_u (local.get $m3) (v128.and (v128.load offset=48 (local.get $p)) (local.get $mask))))
        (local.set $i (i32.add (local.get $i) (i32.const 16)))
        (br $sixteen)))
    (local.set $m0 (i32x4.max_u (i32x4.max_u (local.get $m0) (local.get $m1)) (i32x4.max_u (local.get $m2) (local.get $m3))))
    (local.set $r (i32x4.extract_lane 0 (local.get $m0)))
    (local.set $x (i32x4.extract_lane 1 (local.get $m0)))
    (local.set $r (select (local.get $x) (local.get $r) (i32.gt_u (local.get $x) (local.get $r))))
    (local.set $x (i32x4.extract_lane 2 (local.get $m0)))
    (local.set $r (select (local.get $x) (local.get $r) (i32.gt_u (local.get $x) (local.get $r))))
    (local.set $x (i32x4.extract_lane 3 (local.get $m0)))
    (local.set $r (select (local.get $x) (local.get $r) (i32.gt_u (local.get $x) (local.get $r))))
    (block $end
      (loop $one
        (br_if $end (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $x (i32.and (i32.load (i32.add (local.get $a) (i32.shl (local.get $i) (i32.const 2)))) (i32.const 0x7fffffff)))
        (local.set $r (select (local.get $x) (local.get $r) (i32.gt_u (local.get $x) (local.get $r))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $one)))
    (if (result f32) (i32.gt_u (local.get $r) (i32.const 0x7f800000))
      (then (f32.const nan))
      (else (f32.reinterpret_i32 (local.get $r)))))`;

export const WAT = `(module
  (import "env" "memory" (memory 1 32768))${[1, 2, 3, 4].map(fold).join('')}${scale}${absmax}
)
`;

const wabt = await wabtInit();
const mod = wabt.parseWat('sum-kernels.wat', WAT, { simd: true });
mod.validate();
const { buffer } = mod.toBinary({ write_debug_names: false });
mod.destroy();
const b64 = Buffer.from(buffer).toString('base64');
const lines = b64.match(/.{1,100}/g)!.map((l) => `  '${l}'`).join(' +\n');
const out = join(process.argv[2] ?? join(import.meta.dirname, '..'), 'coordinator', 'strategies', 'math', 'sum-kernels.ts');
mkdirSync(dirname(out), { recursive: true });
writeFileSync(
  out,
  `// Generated by scripts/gen-wasm.ts (npm run wasm): do not edit. The WebAssembly text is in that script.
// ${buffer.length} bytes: fold1..fold4, scale and absmax, over an imported memory of at most 32768 pages (2 GiB).
export const SUM_KERNELS_WASM_BASE64 =
${lines};
`,
);
console.log(`wrote ${out} (${buffer.length} bytes of wasm)`);
