/**
 * A small ONNX graph builder with reverse-mode automatic differentiation.
 *
 * Model code calls ops on `Value`s; each op emits its ONNX node(s) and records
 * itself on a tape. `backward(loss, wrt)` walks the tape in reverse and emits
 * the gradient nodes, so the finished ONNX model computes the loss and the
 * gradients of every trainable parameter in one run. Each op's gradient rule
 * sits beside its forward, in the `OPS` table below.
 *
 * Shapes are static (one graph per batch shape), which keeps broadcasting and
 * its gradient (sum over broadcast axes) exact and simple.
 *
 * ONNX opset 17 is targeted (ReduceSum takes axes as an input; ReduceMean and
 * ReduceMax take them as an attribute).
 */
import {
  type AttributeProto,
  AttributeProto_AttributeType as AttrType,
  ModelProto,
  type NodeProto,
  type TensorProto,
  TensorProto_DataLocation as DataLocation,
  TensorProto_DataType as DataType,
  type ValueInfoProto,
} from './onnx/gen/onnx.ts';
import { numel } from '../../common/tensor.ts';

export type FloatDType = 'float32' | 'float64';
/** Half precision: frozen base weights, and on CUDA float16 products computed from them (GraphSpec.half). */
export type HalfDType = 'float16' | 'bfloat16';
export type ElemType = FloatDType | HalfDType | 'int64' | 'bool' | 'uint8';

const ONNX_TYPE: Record<ElemType, DataType> = {
  float32: DataType.FLOAT,
  float64: DataType.DOUBLE,
  float16: DataType.FLOAT16,
  bfloat16: DataType.BFLOAT16,
  int64: DataType.INT64,
  bool: DataType.BOOL,
  uint8: DataType.UINT8, // packed 4-bit base weights (quantize.ts)
};

export const OPSET = 17;

type AttrValue = number | number[] | string | { float: number };

/** A tensor-valued node output (or graph input / initializer) with a static shape. */
export class Value {
  constructor(
    readonly name: string,
    readonly shape: number[],
    readonly dtype: ElemType,
    /** True when some trainable parameter flows into this value. */
    readonly requiresGrad: boolean,
  ) {}
  get rank(): number {
    return this.shape.length;
  }
}

interface TapeEntry {
  op: OpName | 'checkpoint';
  inputs: Value[];
  outputs: Value[];
  attrs: OpAttrs;
  /** Checkpoint entries: the segment's function, re-run in the backward pass. */
  segment?: Segment;
}

/** A recomputed segment (Graph.checkpoint): its function and the dropout masks its forward drew. */
interface Segment {
  fn: (inputs: Value[]) => Value[];
  masks: Value[];
}

interface OpAttrs {
  axes?: number[];
  perm?: number[];
  shape?: number[];
  transA?: boolean;
  transB?: boolean;
  sizes?: number[];
  axis?: number;
  /** cast: the element type of the output. */
  to?: ElemType;
  ratio?: number;
  seed?: number;
  /** Extra node outputs an op keeps for its backward (e.g. dropout's mask). */
  saved?: Value[];
  /** frozenGemm: emits a fresh copy of the frozen operand for the backward pass, computed after `after`. */
  rebuild?: (after: Value) => Value;
}

/**
 * The ops and their gradient rules. `forward` emits the ONNX nodes and returns
 * the outputs; `backward` receives the gradients of the outputs (null where an
 * output got none) and returns the gradients of the inputs (null where none is
 * needed).
 */
interface OpDef {
  forward(g: Graph, inputs: Value[], attrs: OpAttrs): Value[];
  backward(g: Graph, e: TapeEntry, grads: Array<Value | null>): Array<Value | null>;
}

type OpName =
  | 'add' | 'sub' | 'mul' | 'div' | 'neg' | 'exp' | 'log' | 'sqrt' | 'tanh' | 'sigmoid'
  | 'gemm' | 'matmul' | 'reduceSum' | 'reduceMean' | 'reshape' | 'transpose' | 'expand'
  | 'softmax' | 'logSoftmax' | 'gather' | 'split' | 'concat' | 'dropout' | 'frozenGemm' | 'cast';

function broadcastShapes(a: number[], b: number[]): number[] {
  const n = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const da = a[a.length - n + i] ?? 1;
    const db = b[b.length - n + i] ?? 1;
    if (da !== db && da !== 1 && db !== 1) {
      throw new Error(`graph: shapes [${a.join(', ')}] and [${b.join(', ')}] do not broadcast`);
    }
    out.push(Math.max(da, db));
  }
  return out;
}

const binary = (onnx: string) => (g: Graph, [a, b]: Value[]): Value[] => [
  g.emit(onnx, [a!, b!], broadcastShapes(a!.shape, b!.shape), a!.dtype, {}, a!.requiresGrad || b!.requiresGrad),
];
const unary = (onnx: string) => (g: Graph, [a]: Value[]): Value[] => [g.emit(onnx, [a!], a!.shape, a!.dtype, {}, a!.requiresGrad)];

const OPS: Record<OpName, OpDef> = {
  add: {
    forward: binary('Add'),
    // Only for inputs that need one: an unused gradient is a dead node that ONNX Runtime still runs
    // (late, keeping its input alive: the attention mask's would hold every layer's scores).
    backward: (g, { inputs: [a, b] }, [gy]) => [
      a!.requiresGrad ? g.unbroadcast(gy!, a!.shape) : null,
      b!.requiresGrad ? g.unbroadcast(gy!, b!.shape) : null,
    ],
  },
  sub: {
    forward: binary('Sub'),
    backward: (g, { inputs: [a, b] }, [gy]) => [
      a!.requiresGrad ? g.unbroadcast(gy!, a!.shape) : null,
      b!.requiresGrad ? g.unbroadcast(g.neg(gy!), b!.shape) : null,
    ],
  },
  mul: {
    forward: binary('Mul'),
    backward: (g, { inputs: [a, b] }, [gy]) => [
      a!.requiresGrad ? g.unbroadcast(g.mul(gy!, b!), a!.shape) : null,
      b!.requiresGrad ? g.unbroadcast(g.mul(gy!, a!), b!.shape) : null,
    ],
  },
  div: {
    // y = a / b: da = g / b, db = -g * y / b
    forward: binary('Div'),
    backward: (g, { inputs: [a, b], outputs: [y] }, [gy]) => [
      a!.requiresGrad ? g.unbroadcast(g.div(gy!, b!), a!.shape) : null,
      b!.requiresGrad ? g.unbroadcast(g.neg(g.div(g.mul(gy!, y!), b!)), b!.shape) : null,
    ],
  },
  neg: { forward: unary('Neg'), backward: (g, _e, [gy]) => [g.neg(gy!)] },
  exp: { forward: unary('Exp'), backward: (g, { outputs: [y] }, [gy]) => [g.mul(gy!, y!)] },
  log: { forward: unary('Log'), backward: (g, { inputs: [a] }, [gy]) => [g.div(gy!, a!)] },
  sqrt: {
    // y = sqrt(a): da = g / (2 y)
    forward: unary('Sqrt'),
    backward: (g, { outputs: [y] }, [gy]) => [g.div(gy!, g.mul(y!, g.scalar(2, y!.dtype)))],
  },
  tanh: {
    // da = g (1 - y^2)
    forward: unary('Tanh'),
    backward: (g, { outputs: [y] }, [gy]) => [g.mul(gy!, g.sub(g.scalar(1, y!.dtype), g.mul(y!, y!)))],
  },
  sigmoid: {
    // da = g y (1 - y)
    forward: unary('Sigmoid'),
    backward: (g, { outputs: [y] }, [gy]) => [g.mul(gy!, g.mul(y!, g.sub(g.scalar(1, y!.dtype), y!)))],
  },
  gemm: {
    // C = op(A) op(B), op = optional transpose, 2-D only.
    forward(g, [a, b], { transA, transB }) {
      const [m, k] = transA ? [a!.shape[1]!, a!.shape[0]!] : [a!.shape[0]!, a!.shape[1]!];
      const [k2, n] = transB ? [b!.shape[1]!, b!.shape[0]!] : [b!.shape[0]!, b!.shape[1]!];
      if (a!.rank !== 2 || b!.rank !== 2 || k !== k2) {
        throw new Error(`graph: gemm shapes [${a!.shape}]${transA ? 'ᵀ' : ''} x [${b!.shape}]${transB ? 'ᵀ' : ''} do not match`);
      }
      return [g.emit('Gemm', [a!, b!], [m, n], a!.dtype, { transA: transA ? 1 : 0, transB: transB ? 1 : 0 }, a!.requiresGrad || b!.requiresGrad)];
    },
    backward(g, { inputs: [a, b], attrs: { transA, transB } }, [gy]) {
      const G = gy!;
      let da: Value | null = null;
      let db: Value | null = null;
      if (a!.requiresGrad) {
        da = !transA ? g.gemm(G, b!, false, !transB) : transB ? g.gemm(b!, G, true, true) : g.gemm(b!, G, false, true);
      }
      if (b!.requiresGrad) {
        db = !transB ? g.gemm(a!, G, !transA, false) : transA ? g.gemm(G, a!, true, true) : g.gemm(G, a!, true, false);
      }
      return [da, db];
    },
  },
  frozenGemm: {
    // y = a op(b), b frozen (no gradient) and re-emitted by `rebuild` for the backward pass
    // instead of being kept alive from the forward pass (4-bit base weights, quantize.ts).
    forward(g, [a, b], { transB }) {
      if (b!.requiresGrad) throw new Error('graph: frozenGemm takes a frozen right operand');
      return OPS.gemm.forward(g, [a!, b!], { transA: false, transB });
    },
    backward(g, { inputs: [a, b], attrs: { transB, rebuild } }, [gy]) {
      if (!a!.requiresGrad) return [null, null];
      return [g.gemm(gy!, rebuild ? rebuild(gy!) : b!, false, !transB), null];
    },
  },
  matmul: {
    // Batched: [..., m, k] @ [..., k, n], batch dims broadcast.
    forward(g, [a, b]) {
      const m = a!.shape[a!.rank - 2]!;
      const k = a!.shape[a!.rank - 1]!;
      const n = b!.shape[b!.rank - 1]!;
      if (b!.shape[b!.rank - 2] !== k) throw new Error(`graph: matmul shapes [${a!.shape}] x [${b!.shape}] do not match`);
      const batch = broadcastShapes(a!.shape.slice(0, -2), b!.shape.slice(0, -2));
      return [g.emit('MatMul', [a!, b!], [...batch, m, n], a!.dtype, {}, a!.requiresGrad || b!.requiresGrad)];
    },
    backward(g, { inputs: [a, b] }, [gy]) {
      return [
        a!.requiresGrad ? g.unbroadcast(g.matmul(gy!, g.swapLast(b!)), a!.shape) : null,
        b!.requiresGrad ? g.unbroadcast(g.matmul(g.swapLast(a!), gy!), b!.shape) : null,
      ];
    },
  },
  reduceSum: {
    // keepdims = 1 always; the gradient broadcasts back.
    forward(g, [a], { axes }) {
      const ax = normAxes(axes!, a!.rank);
      const shape = a!.shape.map((d, i) => (ax.includes(i) ? 1 : d));
      return [g.emit('ReduceSum', [a!, g.constInt64(ax)], shape, a!.dtype, { keepdims: 1 }, a!.requiresGrad)];
    },
    backward: (g, { inputs: [a] }, [gy]) => [g.expand(gy!, a!.shape)],
  },
  reduceMean: {
    forward(g, [a], { axes }) {
      const ax = normAxes(axes!, a!.rank);
      const shape = a!.shape.map((d, i) => (ax.includes(i) ? 1 : d));
      return [g.emit('ReduceMean', [a!], shape, a!.dtype, { axes: ax, keepdims: 1 }, a!.requiresGrad)];
    },
    backward(g, { inputs: [a], attrs: { axes } }, [gy]) {
      const ax = normAxes(axes!, a!.rank);
      const count = ax.reduce((n, i) => n * a!.shape[i]!, 1);
      return [g.expand(g.mul(gy!, g.scalar(1 / count, a!.dtype)), a!.shape)];
    },
  },
  reshape: {
    forward(g, [a], { shape }) {
      if (numel(shape!) !== numel(a!.shape)) throw new Error(`graph: cannot reshape [${a!.shape}] to [${shape}]`);
      return [g.emit('Reshape', [a!, g.constInt64(shape!)], shape!, a!.dtype, {}, a!.requiresGrad)];
    },
    backward: (g, { inputs: [a] }, [gy]) => [g.reshape(gy!, a!.shape)],
  },
  transpose: {
    forward(g, [a], { perm }) {
      return [g.emit('Transpose', [a!], perm!.map((p) => a!.shape[p]!), a!.dtype, { perm: perm! }, a!.requiresGrad)];
    },
    backward(g, { attrs: { perm } }, [gy]) {
      const inv = new Array<number>(perm!.length);
      perm!.forEach((p, i) => (inv[p] = i));
      return [g.transpose(gy!, inv)];
    },
  },
  expand: {
    forward(g, [a], { shape }) {
      const out = broadcastShapes(a!.shape, shape!);
      return [g.emit('Expand', [a!, g.constInt64(out)], out, a!.dtype, {}, a!.requiresGrad)];
    },
    backward: (g, { inputs: [a] }, [gy]) => [g.unbroadcast(gy!, a!.shape)],
  },
  softmax: {
    // Over the last axis: da = y (g - sum(g y))
    forward: (g, [a]) => [g.emit('Softmax', [a!], a!.shape, a!.dtype, { axis: -1 }, a!.requiresGrad)],
    backward(g, { outputs: [y] }, [gy]) {
      const gyY = g.mul(gy!, y!);
      return [g.sub(gyY, g.mul(y!, g.reduceSum(gyY, [-1])))];
    },
  },
  logSoftmax: {
    // Over the last axis: da = g - exp(y) sum(g)
    forward: (g, [a]) => [g.emit('LogSoftmax', [a!], a!.shape, a!.dtype, { axis: -1 }, a!.requiresGrad)],
    backward(g, { outputs: [y] }, [gy]) {
      const p = g.emit('Exp', [y!], y!.shape, y!.dtype, {}, true);
      return [g.sub(gy!, g.mul(p, g.reduceSum(gy!, [-1])))];
    },
  },
  gather: {
    // Embedding lookup: table [V, H], ids int64 [N] -> [N, H].
    // d table = onehot(ids)ᵀ g (rows of repeated ids add up).
    forward(g, [table, ids]) {
      return [g.emit('Gather', [table!, ids!], [...ids!.shape, table!.shape[1]!], table!.dtype, { axis: 0 }, table!.requiresGrad)];
    },
    backward(g, { inputs: [table, ids] }, [gy]) {
      const oneHot = g.oneHot(ids!, table!.shape[0]!, table!.dtype);
      return [g.gemm(oneHot, gy!, true, false), null];
    },
  },
  split: {
    // Split along `axis` into pieces of `sizes`; the gradient concatenates (zeros for unused pieces).
    forward(g, [a], { axis, sizes }) {
      const ax = normAxes([axis!], a!.rank)[0]!;
      const shapes = sizes!.map((s) => a!.shape.map((d, i) => (i === ax ? s : d)));
      return g.emitMulti('Split', [a!, g.constInt64(sizes!)], shapes, a!.dtype, { axis: ax }, a!.requiresGrad);
    },
    backward(g, { outputs, attrs: { axis } }, grads) {
      const parts = grads.map((gr, i) => gr ?? g.zeros(outputs[i]!.shape, outputs[i]!.dtype));
      return [g.concat(parts, axis!)];
    },
  },
  concat: {
    forward(g, inputs, { axis }) {
      const ax = normAxes([axis!], inputs[0]!.rank)[0]!;
      const shape = [...inputs[0]!.shape];
      shape[ax] = inputs.reduce((n, v) => n + v.shape[ax]!, 0);
      return [g.emit('Concat', inputs, shape, inputs[0]!.dtype, { axis: ax }, inputs.some((v) => v.requiresGrad))];
    },
    backward(g, { inputs, attrs: { axis } }, [gy]) {
      const ax = normAxes([axis!], inputs[0]!.rank)[0]!;
      const sizes = inputs.map((v) => v.shape[ax]!);
      const shapes = sizes.map((s) => gy!.shape.map((d, i) => (i === ax ? s : d)));
      return g.emitMulti('Split', [gy!, g.constInt64(sizes)], shapes, gy!.dtype, { axis: ax }, true);
    },
  },
  cast: {
    // A change of float precision (mixed-precision products): the gradient is cast back to the input's type.
    forward: (g, [a], { to }) => [g.emit('Cast', [a!], a!.shape, to!, { to: ONNX_TYPE[to!] }, a!.requiresGrad)],
    backward: (g, { inputs: [a] }, [gy]) => [g.cast(gy!, a!.dtype)],
  },
  dropout: {
    // Training-mode dropout: y = a * mask / (1 - ratio); da = g * mask / (1 - ratio).
    // y is computed from the mask (Where, then the scale in the graph's dtype) rather than taken from
    // Dropout's own output: ONNX Runtime's EliminateDropout removes a Dropout whose mask nothing
    // reads (a dropout whose input needs no gradient, e.g. on the first layer's frozen input), and
    // Dropout scales in float32 even in float64 graphs. A recomputed segment reuses its forward's masks.
    forward(g, [a], attrs) {
      let mask = g.replayedMask();
      if (!mask) {
        mask = new Value(g.fresh('dropout_mask'), a!.shape, 'bool', false);
        const unused = new Value(g.fresh('dropout_unused'), a!.shape, a!.dtype, false);
        g.values.set(mask.name, mask).set(unused.name, unused);
        g.drewMask(mask);
        g.node('Dropout', [a!.name, g.scalar(attrs.ratio!, a!.dtype).name, g.constBool(true).name], [unused.name, mask.name], { seed: attrs.seed! });
      }
      attrs.saved = [mask];
      const kept = g.emit('Where', [mask, a!, g.scalar(0, a!.dtype)], a!.shape, a!.dtype, {}, a!.requiresGrad);
      return [g.emit('Mul', [kept, g.scalar(1 / (1 - attrs.ratio!), a!.dtype)], a!.shape, a!.dtype, {}, a!.requiresGrad)];
    },
    backward(g, { inputs: [a], attrs: { ratio, saved } }, [gy]) {
      const m = g.cast(saved![0]!, a!.dtype);
      return [g.mul(g.mul(gy!, m), g.scalar(1 / (1 - ratio!), a!.dtype))];
    },
  },
};

function normAxes(axes: number[], rank: number): number[] {
  return axes.map((a) => (a < 0 ? a + rank : a)).sort((x, y) => x - y);
}

export interface ConstTensor {
  name: string;
  shape: number[];
  dtype: ElemType;
  bytes: Uint8Array;
}

/**
 * Builds one ONNX graph. Inputs and initializers are declared up front; ops are
 * recorded on the tape as they are called.
 */
export class Graph {
  readonly nodes: NodeProto[] = [];
  readonly inputs: Value[] = [];
  readonly outputs: Value[] = [];
  readonly initializers: ConstTensor[] = [];
  private readonly externals: Array<{ name: string; shape: number[]; dtype: ElemType; location: string; offset: number; length: number }> = [];
  /** Every node output by name, with its shape and dtype (memory planning reads it). */
  readonly values = new Map<string, Value>();
  private tape: TapeEntry[] = [];
  /** Collects the dropout masks drawn inside a checkpointed segment's forward. */
  private maskSink: Value[] | null = null;
  /** While recomputing a segment: its masks, handed out in the order they were drawn. */
  private maskReplay: { masks: Value[]; next: number } | null = null;
  private counter = 0;
  private readonly constCache = new Map<string, Value>();
  private recording = true;

  constructor(readonly dtype: FloatDType) {}

  fresh(prefix: string): string {
    return `${prefix}_${this.counter++}`;
  }

  // ---- declarations -------------------------------------------------------

  /** A graph input; `trainable` inputs are what `backward` differentiates with respect to. */
  input(name: string, shape: number[], dtype: ElemType, trainable = false): Value {
    const v = new Value(name, shape, dtype, trainable);
    this.inputs.push(v);
    return v;
  }

  /** A constant stored in the model (base weights, tables). The bytes are referenced, not copied, until serialization. */
  initializer(name: string, shape: number[], dtype: ElemType, data: ArrayBufferView): Value {
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const expected = numel(shape) * bytesPer(dtype);
    if (bytes.byteLength !== expected) {
      throw new Error(`graph: initializer ${name} has ${bytes.byteLength} bytes, shape [${shape}] ${dtype} needs ${expected}`);
    }
    this.initializers.push({ name, shape, dtype, bytes });
    return new Value(name, shape, dtype, false);
  }

  /**
   * A constant whose bytes stay in a file: `length` bytes at `offset` of `location`, a file name
   * relative to the folder the session is given (runtime.ts, externalDataDir). ONNX Runtime maps
   * them from there; nothing of them is in the model bytes.
   */
  externalInitializer(name: string, shape: number[], dtype: ElemType, ref: { location: string; offset: number; length: number }): Value {
    const expected = numel(shape) * bytesPer(dtype);
    if (ref.length !== expected) throw new Error(`graph: external initializer ${name} has ${ref.length} bytes, shape [${shape}] ${dtype} needs ${expected}`);
    if (!ref.location || ref.location.includes('/') || ref.location.includes('\\')) throw new Error(`graph: external initializer ${name}: location must be a file name, got ${JSON.stringify(ref.location)}`);
    this.externals.push({ name, shape, dtype, ...ref });
    return new Value(name, shape, dtype, false);
  }

  /** The graph names constants kept in files (externalInitializer). */
  get hasExternalData(): boolean {
    return this.externals.length > 0;
  }

  /** A float constant in the graph's dtype, converting from float64 values. */
  constFloat(name: string, shape: number[], values: ArrayLike<number>, dtype: FloatDType = this.dtype): Value {
    const arr = dtype === 'float64' ? Float64Array.from(values) : Float32Array.from(values);
    return this.initializer(this.fresh(name), shape, dtype, arr);
  }

  scalar(v: number, dtype: ElemType = this.dtype): Value {
    const key = `s:${dtype}:${v}`;
    let c = this.constCache.get(key);
    if (!c) {
      const arr = dtype === 'float64' ? Float64Array.of(v) : dtype === 'int64' ? BigInt64Array.of(BigInt(v)) : Float32Array.of(v);
      c = this.initializer(this.fresh('scalar'), [], dtype, arr);
      this.constCache.set(key, c);
    }
    return c;
  }

  constInt64(values: number[]): Value {
    const key = `i:${values.join(',')}`;
    let c = this.constCache.get(key);
    if (!c) {
      c = this.initializer(this.fresh('ints'), [values.length], 'int64', BigInt64Array.from(values, (x) => BigInt(x)));
      this.constCache.set(key, c);
    }
    return c;
  }

  constBool(v: boolean): Value {
    const key = `b:${v}`;
    let c = this.constCache.get(key);
    if (!c) {
      c = this.initializer(this.fresh('bool'), [], 'bool', Uint8Array.of(v ? 1 : 0));
      this.constCache.set(key, c);
    }
    return c;
  }

  output(v: Value, name?: string): Value {
    if (name && name !== v.name) {
      const out = new Value(name, v.shape, v.dtype, false);
      this.values.set(name, out);
      this.node('Identity', [v.name], [name]);
      this.outputs.push(out);
      return out;
    }
    this.outputs.push(v);
    return v;
  }

  // ---- raw node emission (not recorded) ------------------------------------

  node(opType: string, inputs: string[], outputs: string[], attrs: Record<string, AttrValue> = {}): void {
    this.nodes.push({
      input: inputs,
      output: outputs,
      name: `${opType}_${this.nodes.length}`,
      opType,
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
      domain: '',
    });
  }

  emit(opType: string, inputs: Value[], shape: number[], dtype: ElemType, attrs: Record<string, AttrValue>, requiresGrad: boolean): Value {
    const out = new Value(this.fresh(opType.toLowerCase()), shape, dtype, requiresGrad);
    this.values.set(out.name, out);
    this.node(opType, inputs.map((v) => v.name), [out.name], attrs);
    return out;
  }

  emitMulti(opType: string, inputs: Value[], shapes: number[][], dtype: ElemType, attrs: Record<string, AttrValue>, requiresGrad: boolean): Value[] {
    const outs = shapes.map((s) => new Value(this.fresh(opType.toLowerCase()), s, dtype, requiresGrad));
    for (const o of outs) this.values.set(o.name, o);
    this.node(opType, inputs.map((v) => v.name), outs.map((o) => o.name), attrs);
    return outs;
  }

  cast(v: Value, to: ElemType): Value {
    return this.emit('Cast', [v], v.shape, to, { to: ONNX_TYPE[to] }, false);
  }

  /** onehot(ids)[..., V] in `dtype`, built from Equal against 0..V-1 (no gradient). */
  oneHot(ids: Value, depth: number, dtype: ElemType): Value {
    const key = `onehot:${ids.name}:${depth}:${dtype}`;
    const cached = this.constCache.get(key);
    if (cached) return cached;
    const range = this.initializer(this.fresh('range'), [depth], 'int64', BigInt64Array.from({ length: depth }, (_, i) => BigInt(i)));
    const col = this.emit('Unsqueeze', [ids, this.constInt64([-1])], [...ids.shape, 1], 'int64', {}, false);
    const eq = this.emit('Equal', [col, range], [...ids.shape, depth], 'bool', {}, false);
    const out = this.cast(eq, dtype);
    this.constCache.set(key, out);
    return out;
  }

  zeros(shape: number[], dtype: ElemType): Value {
    return this.emit('Expand', [this.scalar(0, dtype), this.constInt64(shape)], shape, dtype, {}, false);
  }

  /** Sum `g` down to `shape` (the gradient of numpy-style broadcasting). */
  unbroadcast(g: Value, shape: number[]): Value {
    if (g.shape.length === shape.length && g.shape.every((d, i) => d === shape[i])) return g;
    const lead = g.rank - shape.length;
    const axes: number[] = [];
    for (let i = 0; i < g.rank; i++) {
      if (i < lead || (shape[i - lead] === 1 && g.shape[i] !== 1)) axes.push(i);
    }
    const summed = axes.length ? this.reduceSum(g, axes) : g;
    return this.reshape(summed, shape);
  }

  swapLast(v: Value): Value {
    const perm = v.shape.map((_, i) => i);
    perm[v.rank - 2] = v.rank - 1;
    perm[v.rank - 1] = v.rank - 2;
    return this.transpose(v, perm);
  }

  // ---- recorded ops ---------------------------------------------------------

  private apply(op: OpName, inputs: Value[], attrs: OpAttrs = {}): Value[] {
    const outputs = OPS[op].forward(this, inputs, attrs);
    if (this.recording && outputs.some((o) => o.requiresGrad)) this.tape.push({ op, inputs, outputs, attrs });
    return outputs;
  }
  private one(op: OpName, inputs: Value[], attrs: OpAttrs = {}): Value {
    return this.apply(op, inputs, attrs)[0]!;
  }

  add(a: Value, b: Value): Value { return this.one('add', [a, b]); }
  sub(a: Value, b: Value): Value { return this.one('sub', [a, b]); }
  mul(a: Value, b: Value): Value { return this.one('mul', [a, b]); }
  div(a: Value, b: Value): Value { return this.one('div', [a, b]); }
  neg(a: Value): Value { return this.one('neg', [a]); }
  exp(a: Value): Value { return this.one('exp', [a]); }
  log(a: Value): Value { return this.one('log', [a]); }
  sqrt(a: Value): Value { return this.one('sqrt', [a]); }
  tanh(a: Value): Value { return this.one('tanh', [a]); }
  sigmoid(a: Value): Value { return this.one('sigmoid', [a]); }
  gemm(a: Value, b: Value, transA = false, transB = false): Value { return this.one('gemm', [a, b], { transA, transB }); }
  /** a op(b) with b frozen; the backward pass uses `rebuild(gradient)` (a fresh b) instead of keeping b. */
  gemmFrozen(a: Value, b: Value, transB: boolean, rebuild?: (after: Value) => Value): Value { return this.one('frozenGemm', [a, b], { transB, rebuild }); }
  matmul(a: Value, b: Value): Value { return this.one('matmul', [a, b]); }
  reduceSum(a: Value, axes: number[]): Value { return this.one('reduceSum', [a], { axes }); }
  reduceMean(a: Value, axes: number[]): Value { return this.one('reduceMean', [a], { axes }); }
  reshape(a: Value, shape: number[]): Value { return this.one('reshape', [a], { shape }); }
  transpose(a: Value, perm: number[]): Value { return this.one('transpose', [a], { perm }); }
  expand(a: Value, shape: number[]): Value { return this.one('expand', [a], { shape }); }
  softmax(a: Value): Value { return this.one('softmax', [a]); }
  logSoftmax(a: Value): Value { return this.one('logSoftmax', [a]); }
  gather(table: Value, ids: Value): Value { return this.one('gather', [table, ids]); }
  split(a: Value, axis: number, sizes: number[]): Value[] { return this.apply('split', [a], { axis, sizes }); }
  concat(parts: Value[], axis: number): Value { return this.one('concat', parts, { axis }); }
  /** `a` in another float type, differentiable (the plain `cast` is not recorded). */
  castTo(a: Value, to: ElemType): Value {
    return a.dtype === to ? a : this.one('cast', [a], { to });
  }
  dropout(a: Value, ratio: number, seed: number): Value {
    return ratio > 0 ? this.one('dropout', [a], { ratio, seed }) : a;
  }

  // ---- recompute (gradient checkpointing) -------------------------------------

  /**
   * A recomputed segment: `fn(inputs)` is emitted for the forward pass as usual,
   * but the backward pass keeps none of its intermediates. When the gradient
   * reaches the segment's outputs, the backward re-emits `fn` on its saved
   * inputs and differentiates that copy, so between the forward and that point
   * only the inputs (and any dropout masks, which are replayed, not redrawn)
   * stay alive. `fn` must be free of side effects other than emitting ops, and
   * may use values from outside the segment (parameters, constants): their
   * gradients flow out as usual.
   *
   * The copy's inputs pass through a barrier, input + 0 · (one element of the
   * incoming gradient), which makes the recomputation depend on the gradient:
   * ONNX Runtime cannot run it before the backward reaches the segment, and its
   * common-subexpression elimination cannot merge it with the forward copy.
   */
  checkpoint(inputs: Value[], fn: (inputs: Value[]) => Value[]): Value[] {
    if (!this.recording || this.maskReplay) return fn(inputs); // inside a backward pass or another recomputation
    const start = this.tape.length;
    const outerSink = this.maskSink;
    const masks: Value[] = [];
    this.maskSink = masks;
    let outputs: Value[];
    try {
      outputs = fn(inputs);
    } finally {
      this.maskSink = outerSink;
    }
    outerSink?.push(...masks);
    // The segment's own tape entries are dropped: the backward differentiates the recomputed copy.
    this.tape.length = start;
    if (outputs.some((o) => o.requiresGrad)) this.tape.push({ op: 'checkpoint', inputs, outputs, attrs: {}, segment: { fn, masks } });
    return outputs;
  }

  /** Dropout: the mask to reuse while a segment is recomputed (null otherwise). */
  replayedMask(): Value | null {
    const r = this.maskReplay;
    if (!r) return null;
    const m = r.masks[r.next++];
    if (!m) throw new Error('graph: a recomputed segment drew more dropout masks than its forward');
    return m;
  }

  /** Dropout: records a mask drawn inside a checkpointed segment. */
  drewMask(mask: Value): void {
    this.maskSink?.push(mask);
  }

  private recompute(e: TapeEntry, outGrads: Array<Value | null>, grads: Map<string, Value>, accumulate: (v: Value, g: Value) => void): Array<Value | null> {
    const seg = e.segment!;
    const gy = outGrads.find((gr): gr is Value => gr !== null)!;
    const flat = this.emit('Reshape', [gy, this.constInt64([-1])], [numel(gy.shape)], gy.dtype, {}, false);
    const first = this.emit('Slice', [flat, this.constInt64([0]), this.constInt64([1])], [1], gy.dtype, {}, false);
    const zero = this.emit('Mul', [first, this.scalar(0, gy.dtype as FloatDType)], [1], gy.dtype, {}, false);
    const barred = e.inputs.map((x) =>
      x.dtype === 'float32' || x.dtype === 'float64'
        ? this.emit('Add', [x, x.dtype === gy.dtype ? zero : this.cast(zero, x.dtype)], x.shape, x.dtype, {}, x.requiresGrad)
        : x,
    );
    // Re-emit the segment with recording on, onto a tape of its own, replaying its dropout masks.
    const outerTape = this.tape;
    this.tape = [];
    this.recording = true;
    this.maskReplay = { masks: seg.masks, next: 0 };
    let outs: Value[];
    let local: TapeEntry[];
    try {
      outs = seg.fn(barred);
      local = this.tape;
    } finally {
      this.tape = outerTape;
      this.recording = false;
      this.maskReplay = null;
    }
    outs.forEach((o, i) => {
      const gr = outGrads[i];
      if (gr && o.requiresGrad) accumulate(o, gr);
    });
    const before = new Map(grads);
    this.reverse(local, grads, accumulate);
    const inGrads = e.inputs.map((x, i) => (barred[i] !== x ? (grads.get(barred[i]!.name) ?? null) : null));
    // The gradients the segment passes out to values from outside it (its parameters), made inputs
    // of the gradients it passes down: ONNX Runtime then computes them with the segment's backward,
    // freeing the recomputed intermediates, instead of late (it orders nodes by a depth-first walk
    // from the graph outputs, and a parameter's gradient is an output only the walk from that
    // output reaches).
    const localNames = new Set(local.flatMap((t) => t.outputs.map((o) => o.name)));
    const passedOut = [...grads].filter(([name, v]) => before.get(name) !== v && !localNames.has(name) && !barred.some((b) => b.name === name)).map(([, v]) => v);
    if (passedOut.length === 0 || inGrads.every((gx) => gx === null)) return inGrads;
    let dep: Value | null = null;
    for (const v of passedOut) {
      const f = this.emit('Reshape', [v, this.constInt64([-1])], [numel(v.shape)], v.dtype, {}, false);
      const one = this.emit('Slice', [f, this.constInt64([0]), this.constInt64([1])], [1], v.dtype, {}, false);
      dep = dep ? this.emit('Add', [dep, one], [1], v.dtype, {}, false) : one;
    }
    const zero2 = this.emit('Mul', [dep!, this.scalar(0, dep!.dtype as FloatDType)], [1], dep!.dtype, {}, false);
    return inGrads.map((gx) => (gx ? this.emit('Add', [gx, gx.dtype === zero2.dtype ? zero2 : this.cast(zero2, gx.dtype)], gx.shape, gx.dtype, {}, false) : gx));
  }

  // ---- reverse mode -----------------------------------------------------------

  /**
   * Emit the gradient of the scalar `loss` with respect to each of `wrt`
   * (seeded with d loss = 1, or with `seed`, a [1] value: loss scaling). Returns
   * one gradient value per entry of `wrt` (zeros for parameters the loss does
   * not depend on).
   */
  backward(loss: Value, wrt: Value[], seed?: Value): Value[] {
    if (numel(loss.shape) !== 1) throw new Error(`graph: backward needs a scalar loss, got shape [${loss.shape}]`);
    this.recording = false;
    const grads = new Map<string, Value>();
    const accumulate = (v: Value, gv: Value): void => {
      const prev = grads.get(v.name);
      grads.set(v.name, prev ? this.emit('Add', [prev, gv], v.shape, v.dtype, {}, false) : gv);
    };
    grads.set(loss.name, seed ? this.reshape(seed, loss.shape) : this.expand(this.scalar(1, loss.dtype as FloatDType), loss.shape));
    try {
      this.reverse(this.tape, grads, accumulate);
    } finally {
      this.recording = true;
    }
    return wrt.map((w) => grads.get(w.name) ?? this.zeros(w.shape, w.dtype));
  }

  private reverse(tape: TapeEntry[], grads: Map<string, Value>, accumulate: (v: Value, g: Value) => void): void {
    for (let i = tape.length - 1; i >= 0; i--) {
      const e = tape[i]!;
      const outGrads = e.outputs.map((o) => grads.get(o.name) ?? null);
      if (outGrads.every((gr) => gr === null)) continue;
      const inGrads = e.op === 'checkpoint' ? this.recompute(e, outGrads, grads, accumulate) : OPS[e.op].backward(this, e, outGrads);
      e.inputs.forEach((inp, j) => {
        const gr = inGrads[j];
        if (gr && inp.requiresGrad) accumulate(inp, gr);
      });
    }
  }

  // ---- serialization ------------------------------------------------------------

  toModel(): Uint8Array {
    const valueInfo = (v: Value): ValueInfoProto => ({
      name: v.name,
      type: {
        value: {
          $case: 'tensorType',
          value: { elemType: ONNX_TYPE[v.dtype], shape: { dim: v.shape.map((d) => ({ value: { $case: 'dimValue', value: d } })) } },
        },
      },
    });
    const init: TensorProto[] = this.initializers.map((c) => ({
      dims: c.shape,
      dataType: ONNX_TYPE[c.dtype],
      name: c.name,
      rawData: c.bytes,
      externalData: [],
      dataLocation: DataLocation.DEFAULT,
    }));
    for (const c of this.externals) {
      init.push({
        dims: c.shape,
        dataType: ONNX_TYPE[c.dtype],
        name: c.name,
        rawData: new Uint8Array(0),
        externalData: [
          { key: 'location', value: c.location },
          { key: 'offset', value: String(c.offset) },
          { key: 'length', value: String(c.length) },
        ],
        dataLocation: DataLocation.EXTERNAL,
      });
    }
    const model: ModelProto = {
      irVersion: 8,
      producerName: 'fedtune',
      producerVersion: '0.1.0',
      opsetImport: [{ domain: '', version: OPSET }],
      graph: {
        node: this.nodes,
        name: 'fedtune',
        initializer: init,
        input: this.inputs.map(valueInfo),
        output: this.outputs.map(valueInfo),
      },
    };
    return ModelProto.encode(model).finish();
  }
}

export function bytesPer(dtype: ElemType): number {
  return dtype === 'float64' || dtype === 'int64' ? 8 : dtype === 'bool' || dtype === 'uint8' ? 1 : dtype === 'float16' || dtype === 'bfloat16' ? 2 : 4;
}

function attribute(name: string, v: AttrValue): AttributeProto {
  const a: AttributeProto = {
    name,
    f: 0,
    i: 0,
    s: new Uint8Array(),
    t: undefined,
    floats: [],
    ints: [],
    strings: [],
    type: AttrType.UNDEFINED,
  };
  if (typeof v === 'number') {
    a.i = v;
    a.type = AttrType.INT;
  } else if (typeof v === 'string') {
    a.s = new TextEncoder().encode(v);
    a.type = AttrType.STRING;
  } else if (Array.isArray(v)) {
    a.ints = v;
    a.type = AttrType.INTS;
  } else {
    a.f = v.float;
    a.type = AttrType.FLOAT;
  }
  return a;
}
