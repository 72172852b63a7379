//! Fused CPU kernels, each with its backward pass, for the element-wise hot
//! spots of training (REPRODUCE.md, "Performance"): the attention softmax,
//! the tanh GELU of the feed-forward and the RMS layer norm.
//!
//! Composed from candle ops, a softmax costs five passes over the (b, h,
//! t, t) scores and a fresh tensor per pass, candle's GELU backward twelve,
//! an RMS norm six forward and more backward. Here each is one parallel pass
//! forward and one backward, with the same formulas. On other devices and dtypes (CUDA, bf16) the composed ops
//! run instead, so the results do not depend on which path was taken beyond
//! float rounding.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

/// Rows smaller than this are not worth a thread each.
const MIN_PARALLEL_ELEMS: usize = 1 << 14;

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax(xs, D::Minus1)
    }
}

/// GELU with the tanh approximation (transformers' `gelu_new`, as in T5 v1.1).
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    if fused(xs) {
        xs.contiguous()?.apply_op1(Gelu)
    } else {
        xs.gelu()
    }
}

/// T5's RMS layer norm over the last dimension: x / sqrt(mean(x^2) + eps) *
/// weight, without mean subtraction or bias. Statistics in at least f32.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(xs) && xs.dtype() == weight.dtype() {
        return xs.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps });
    }
    let dtype = xs.dtype();
    let xs = at_least_f32(xs)?;
    let mean_square = xs.sqr()?.mean_keepdim(D::Minus1)?; // (.., 1)
    let normed = xs.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Half-precision tensors in f32; f32 and f64 as they are. Norm statistics
/// and the loss are computed in this precision.
pub(crate) fn at_least_f32(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::BF16 | DType::F16 => xs.to_dtype(DType::F32),
        _ => Ok(xs.clone()),
    }
}

/// Attention of a single query per row and head, for decoding steps that
/// need no gradients: softmax(q k^T + bias) v in one parallel pass over rows
/// and heads. (candle's batched matmul makes one gemm call per row and head:
/// 1,024 calls per product for batch 256 with 4 heads.) On other devices the
/// same formula composed from candle ops.
///
/// q (b, h, 1, d_kv); keys, values (b, h, tk, d_kv) with a contiguous last
/// dimension (views into a decoding cache are fine); bias broadcasts to
/// (b, h, 1, tk). Returns (b, h, 1, d_kv). It has no backward pass: taking
/// gradients through it is an error, never a silent zero.
pub fn attend_one_query(q: &Tensor, keys: &Tensor, values: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, _, tk) = keys.t()?.dims4()?;
    let bias = bias.broadcast_as((b, h, 1, tk))?;
    if fused(q) && keys.stride()[3] == 1 && values.stride()[3] == 1 {
        return q.contiguous()?.apply_op3(keys, values, OneQueryAttention { bias });
    }
    let scores = q.matmul(&keys.t()?)?.add(&bias)?;
    softmax_last_dim(&scores)?.matmul(values)
}

fn fused(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// The contiguous slice a layout covers.
fn slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused kernels take contiguous tensors"),
    }
}

/// Applies `row_op(input rows.., output row)` to each row of `n` elements
/// (the last row may be shorter), rows in parallel when the tensor is large.
fn map_rows<T: Copy + Default + Send + Sync>(
    inputs: &[&[T]],
    n: usize,
    row_op: impl Fn(&[&[T]], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); inputs[0].len()];
    let run = |(i, row): (usize, &mut [T])| {
        let rows: Vec<&[T]> = inputs.iter().map(|input| &input[i * n..i * n + row.len()]).collect();
        row_op(&rows, row);
    };
    if out.len() >= MIN_PARALLEL_ELEMS {
        out.par_chunks_mut(n).enumerate().for_each(run);
    } else {
        out.chunks_mut(n).enumerate().for_each(run);
    }
    out
}

/// Element-wise map in parallel chunks.
fn map_elems<T: Copy + Default + Send + Sync>(input: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    const CHUNK: usize = 4096;
    map_rows(&[input], CHUNK.min(input.len().max(1)), |rows, out| {
        for (o, &x) in out.iter_mut().zip(rows[0]) {
            *o = f(x);
        }
    })
}

/// An element-wise function over an f32 or f64 storage.
fn map_float_storage(
    storage: &CpuStorage,
    layout: &Layout,
    f32_fn: fn(f32) -> f32,
    f64_fn: fn(f64) -> f64,
) -> Result<(CpuStorage, Shape)> {
    let out = match storage {
        CpuStorage::F32(data) => CpuStorage::F32(map_elems(slice(data, layout)?, f32_fn)),
        CpuStorage::F64(data) => CpuStorage::F64(map_elems(slice(data, layout)?, f64_fn)),
        _ => candle_core::bail!("fused element-wise kernels take f32 or f64"),
    };
    Ok((out, layout.shape().clone()))
}

/// Float types the kernels run on.
trait Float: Copy + Default + Send + Sync + num_traits::Float + candle_core::WithDType + 'static {
    fn c(v: f64) -> Self;
}
impl Float for f32 {
    fn c(v: f64) -> Self {
        v as f32
    }
}
impl Float for f64 {
    fn c(v: f64) -> Self {
        v
    }
}

fn softmax_row<T: Float>(x: &[T], y: &mut [T]) {
    let max = x.iter().copied().fold(T::neg_infinity(), num_traits::Float::max);
    let mut sum = T::zero();
    for (y, &x) in y.iter_mut().zip(x) {
        *y = (x - max).exp();
        sum += *y;
    }
    let inv = T::one() / sum;
    y.iter_mut().for_each(|y| *y *= inv);
}

/// dx = y * (g - sum(g * y)) for a softmax output y and its gradient g.
fn softmax_grad_row<T: Float>(y: &[T], g: &[T], dx: &mut [T]) {
    let dot = y.iter().zip(g).fold(T::zero(), |acc, (&y, &g)| acc + y * g);
    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
        *dx = y * (g - dot);
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

/// tanh through one exp: libm's tanhf (via expm1f) was a tenth of a
/// decoding profile. Exact to float rounding; the absolute error near 0 (a
/// few ulps of 1) is far below what the golden test allows.
fn tanh<T: Float>(u: T) -> T {
    T::one() - T::c(2.0) / ((u + u).exp() + T::one())
}

fn gelu_value<T: Float>(x: T) -> T {
    let inner = T::c(SQRT_2_OVER_PI) * x * (T::one() + T::c(GELU_CUBIC) * x * x);
    T::c(0.5) * x * (T::one() + tanh(inner))
}

/// d/dx of `gelu_value`.
fn gelu_derivative<T: Float>(x: T) -> T {
    let inner = T::c(SQRT_2_OVER_PI) * x * (T::one() + T::c(GELU_CUBIC) * x * x);
    let t = tanh(inner);
    let d_inner = T::c(SQRT_2_OVER_PI) * (T::one() + T::c(3.0 * GELU_CUBIC) * x * x);
    T::c(0.5) * (T::one() + t) + T::c(0.5) * x * (T::one() - t * t) * d_inner
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let out = match storage {
            CpuStorage::F32(data) => CpuStorage::F32(map_rows(&[slice(data, layout)?], n, |x, y| softmax_row(x[0], y))),
            CpuStorage::F64(data) => CpuStorage::F64(map_rows(&[slice(data, layout)?], n, |x, y| softmax_row(x[0], y))),
            _ => candle_core::bail!("fused softmax takes f32 or f64"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxGrad)?))
    }
}

/// (softmax output, its gradient) -> gradient of the softmax input.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(map_rows(&[slice(y, l1)?, slice(g, l2)?], n, |r, dx| softmax_grad_row(r[0], r[1], dx)))
            }
            (CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(map_rows(&[slice(y, l1)?, slice(g, l2)?], n, |r, dx| softmax_grad_row(r[0], r[1], dx)))
            }
            _ => candle_core::bail!("fused softmax gradient takes two f32 or two f64 tensors"),
        };
        Ok((out, l1.shape().clone()))
    }
}

struct RmsNorm {
    eps: f64,
}

/// 1 / sqrt(mean(x^2) + eps) of one row.
fn inverse_rms<T: Float>(x: &[T], eps: T) -> T {
    let sum = x.iter().fold(T::zero(), |acc, &v| acc + v * v);
    T::one() / (sum / T::c(x.len() as f64) + eps).sqrt()
}

/// Rows per block of the weight-gradient sum: blocks are summed in parallel
/// and then in order, so the result does not depend on thread timing.
const NORM_BLOCK_ROWS: usize = 32;

/// Gradients of y = x * r(x) * w for one (rows, n) input: dx = r * (g w -
/// x r^2 mean(g w x)) and dw = sum over rows of g x r.
fn rms_norm_backward<T: Float>(x: &[T], w: &[T], g: &[T], eps: T) -> (Vec<T>, Vec<T>) {
    let n = w.len();
    let mut dx = vec![T::zero(); x.len()];
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(n * NORM_BLOCK_ROWS)
        .enumerate()
        .map(|(block, dx_block)| {
            let mut dw = vec![T::zero(); n];
            for (i, dx_row) in dx_block.chunks_mut(n).enumerate() {
                let start = (block * NORM_BLOCK_ROWS + i) * n;
                let (x, g) = (&x[start..start + n], &g[start..start + n]);
                let r = inverse_rms(x, eps);
                let dot = (0..n).fold(T::zero(), |acc, j| acc + g[j] * w[j] * x[j]);
                let scale = r * r * dot / T::c(n as f64);
                for j in 0..n {
                    dx_row[j] = r * (g[j] * w[j] - x[j] * scale);
                    dw[j] += g[j] * x[j] * r;
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![T::zero(); n];
    for partial in partials {
        dw.iter_mut().zip(partial).for_each(|(total, p)| *total += p);
    }
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn forward<T: Float>(x: &[T], w: &[T], eps: T) -> Vec<T> {
            map_rows(&[x], w.len(), |rows, y| {
                let r = inverse_rms(rows[0], eps);
                for ((y, &x), &w) in y.iter_mut().zip(rows[0]).zip(w) {
                    *y = x * r * w;
                }
            })
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(forward(slice(x, l1)?, slice(w, l2)?, self.eps as f32))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(forward(slice(x, l1)?, slice(w, l2)?, self.eps))
            }
            _ => candle_core::bail!("fused rms norm takes two f32 or two f64 tensors"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        /// Reads the tensors as `T`, runs `rms_norm_backward`, and wraps the results.
        fn gradients<T: Float>(x: &Tensor, w: &Tensor, grad: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
            let flat = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<T>();
            let (dx, dw) = rms_norm_backward(&flat(x)?, &flat(w)?, &flat(grad)?, T::c(eps));
            Ok((Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dw, w.shape(), w.device())?))
        }
        let (dx, dw) = match x.dtype() {
            DType::F32 => gradients::<f32>(x, w, grad, self.eps)?,
            _ => gradients::<f64>(x, w, grad, self.eps)?,
        };
        Ok((Some(dx), Some(dw)))
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_float_storage(storage, layout, gelu_value, gelu_value)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((arg.apply_op1_no_bwd(&GeluDerivative)? * grad_res)?))
    }
}

struct GeluDerivative;

impl CustomOp1 for GeluDerivative {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-derivative"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_float_storage(storage, layout, gelu_derivative, gelu_derivative)
    }
}

struct OneQueryAttention {
    /// (b, h, 1, tk), usually a broadcast view.
    bias: Tensor,
}

impl CustomOp3 for OneQueryAttention {
    fn name(&self) -> &'static str {
        "fused-one-query-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        keys: &CpuStorage,
        keys_layout: &Layout,
        values: &CpuStorage,
        values_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bias, bias_layout) = self.bias.storage_and_layout();
        let Storage::Cpu(bias) = &*bias else { candle_core::bail!("fused attention: bias not on the CPU") };
        let layouts = [keys_layout, values_layout, bias_layout];
        let out = match (q, keys, values, bias) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v), CpuStorage::F32(bias)) => {
                CpuStorage::F32(one_query_attention(slice(q, q_layout)?, [k, v, bias], layouts))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v), CpuStorage::F64(bias)) => {
                CpuStorage::F64(one_query_attention(slice(q, q_layout)?, [k, v, bias], layouts))
            }
            _ => candle_core::bail!("fused attention takes f32 or f64 tensors of one dtype"),
        };
        Ok((out, q_layout.shape().clone()))
    }
}

/// `q` (b * h rows of d_kv); keys, values and bias with their layouts (see
/// `attend_one_query`). Returns b * h rows of d_kv.
fn one_query_attention<T: Float>(q: &[T], [keys, values, bias]: [&[T]; 3], layouts: [&Layout; 3]) -> Vec<T> {
    let dims = layouts[0].dims();
    let (heads, tk, d_kv) = (dims[1], dims[2], dims[3]);
    // Offset of (row, head, position) in keys, values (position on axis 2)
    // and bias (axis 3).
    let offset = |which: usize, row: usize, head: usize, pos: usize| {
        let (layout, s) = (layouts[which], layouts[which].stride());
        layout.start_offset() + row * s[0] + head * s[1] + pos * s[if which == 2 { 3 } else { 2 }]
    };
    let attend = |scores: &mut Vec<T>, (i, out): (usize, &mut [T])| {
        let (row, head) = (i / heads, i % heads);
        let query = &q[i * d_kv..(i + 1) * d_kv];
        scores.clear();
        scores.extend((0..tk).map(|pos| {
            let key = &keys[offset(0, row, head, pos)..][..d_kv];
            dot(query, key) + bias[offset(2, row, head, pos)]
        }));
        let max = scores.iter().copied().fold(T::neg_infinity(), num_traits::Float::max);
        let mut sum = T::zero();
        scores.iter_mut().for_each(|s| {
            *s = (*s - max).exp();
            sum += *s;
        });
        out.iter_mut().for_each(|o| *o = T::zero());
        for (pos, &weight) in scores.iter().enumerate() {
            let value = &values[offset(1, row, head, pos)..][..d_kv];
            out.iter_mut().zip(value).for_each(|(o, &v)| *o += weight * v);
        }
        let inv = T::one() / sum;
        out.iter_mut().for_each(|o| *o *= inv);
    };
    let mut out = vec![T::zero(); q.len()];
    if q.len() * tk >= MIN_PARALLEL_ELEMS {
        out.par_chunks_mut(d_kv).enumerate().for_each_init(Vec::new, attend);
    } else {
        let mut scores = Vec::new();
        out.chunks_mut(d_kv).enumerate().for_each(|item| attend(&mut scores, item));
    }
    out
}

/// A dot product in eight lanes, which the compiler can vectorise (a plain
/// fold may not be reordered).
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a_chunks.remainder().iter().zip(b_chunks.remainder()).fold(T::zero(), |acc, (&x, &y)| acc + x * y);
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().fold(tail, |acc, &l| acc + l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn sample(shape: (usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn fused_ops_match_the_composed_ones_forward_and_backward() {
        // Large enough for the parallel path, and a small one for the serial path.
        for shape in [(4, 64, 300), (2, 3, 5)] {
            let x = candle_core::Var::from_tensor(&sample(shape)).unwrap();
            let weights = sample(shape).sin().unwrap(); // an arbitrary upstream gradient
            for (fused, composed) in [
                (softmax_last_dim(&x).unwrap(), candle_nn::ops::softmax(&x, D::Minus1).unwrap()),
                (gelu(&x).unwrap(), x.gelu().unwrap()),
            ] {
                assert!(max_diff(&fused, &composed) < 1e-6, "forward {shape:?}");
                let g_fused = (&fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                let g_composed = (&composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                let (a, b) = (g_fused.get(&x).unwrap(), g_composed.get(&x).unwrap());
                assert!(max_diff(a, b) < 1e-5, "backward {shape:?}: {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn fused_rms_norm_matches_the_composed_one_forward_and_backward() {
        for shape in [(4, 64, 300), (2, 3, 5)] {
            let x = candle_core::Var::from_tensor(&sample(shape)).unwrap();
            let w =
                candle_core::Var::from_tensor(&sample((1, 1, shape.2)).flatten_all().unwrap().cos().unwrap()).unwrap();
            let upstream = sample(shape).sin().unwrap();
            let fused = rms_norm(&x, &w, 1e-6).unwrap();
            let mean_square = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let composed =
                x.broadcast_div(&(mean_square + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-5, "forward {shape:?}");
            let g_fused = (&fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let g_composed = (&composed * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            for var in [&x, &w] {
                let (a, b) = (g_fused.get(var).unwrap(), g_composed.get(var).unwrap());
                let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(max_diff(a, b) <= 1e-5 * scale.max(1.0), "backward {shape:?}: {}", max_diff(a, b));
            }
        }
    }

    #[test]
    fn one_query_attention_matches_the_composed_formula_on_cache_views() {
        let (b, h, d_kv, tk) = (3, 2, 10, 7);
        let q = sample((b * h, 1, d_kv)).reshape((b, h, 1, d_kv)).unwrap().affine(0.3, 0.0).unwrap();
        // Keys and values as views of the first tk positions of a longer
        // buffer, as the decoding cache hands them over.
        let buffer = sample((b * h, tk + 5, d_kv)).reshape((b, h, tk + 5, d_kv)).unwrap();
        let keys = buffer.narrow(2, 0, tk).unwrap();
        let values = buffer.cos().unwrap().narrow(2, 0, tk).unwrap();
        let position_bias = sample((1, h, tk)).reshape((1, h, 1, tk)).unwrap(); // broadcast over rows
        let padding_bias = sample((b, 1, tk)).reshape((b, 1, 1, tk)).unwrap(); // broadcast over heads
        for bias in [position_bias, padding_bias] {
            let fused = attend_one_query(&q, &keys, &values, &bias).unwrap();
            let scores = q.matmul(&keys.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
            let composed = candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&values).unwrap();
            assert_eq!(fused.dims(), &[b, h, 1, d_kv]);
            assert!(max_diff(&fused, &composed) < 1e-5, "{}", max_diff(&fused, &composed));
        }
    }

    #[test]
    fn one_query_attention_refuses_gradients() {
        let q = candle_core::Var::from_tensor(&sample((1, 1, 4)).reshape((1, 1, 1, 4)).unwrap()).unwrap();
        let keys = sample((1, 3, 4)).reshape((1, 1, 3, 4)).unwrap();
        let bias = Tensor::zeros((1, 1, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let out = attend_one_query(&q, &keys, &keys, &bias).unwrap();
        assert!(out.sum_all().unwrap().backward().is_err());
    }
}
