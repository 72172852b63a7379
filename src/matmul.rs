//! Matrix products whose bits do not depend on the CPU's cache sizes.
//!
//! candle multiplies f32 matrices on the CPU with the gemm crate, which cuts
//! the inner dimension k into blocks of kc and sums block after block.
//! gemm-common derives kc from the L1 data cache it reads in sysfs: 512 for a
//! 32 KiB 8-way L1d, 1024 for a 48 KiB 12-way one (both seen on this
//! project's machine type), never less than 512, and k itself when k <= 512.
//! So a product with k > 512 is summed in an order that depends on the CPU.
//! In training that is every weight gradient of a linear layer, whose k is the
//! tokens of a micro-batch.
//!
//! Here a product is cut into k-blocks of at most [`MAX_BLOCK`] and the
//! blocks are accumulated in order: every gemm call has k <= 512, so it takes
//! kc = k whatever the cache, and the result has the same bits on every
//! x86-64 CPU whose gemm kernel is the same (AVX2 with FMA: gemm's AVX-512
//! kernels are not compiled in; REPRODUCE.md, "Hashes").

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::OnceLock;

/// The largest k handed to one gemm call; gemm-common's smallest kc for a
/// large k, so a block of this size is never cut again.
pub const MAX_BLOCK: usize = 512;

/// How CPU products are computed: [`Kernels::Portable`] (blocked as above,
/// the default) or [`Kernels::Native`] (candle's matmul as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    Portable,
    Native,
}

impl Kernels {
    /// The process's mode, read once from `SECTOR_KERNELS` (`portable`, the
    /// default, or `native`). An unknown value is an error at first use.
    pub fn current() -> Result<Kernels> {
        static MODE: OnceLock<std::result::Result<Kernels, String>> = OnceLock::new();
        MODE.get_or_init(|| match std::env::var("SECTOR_KERNELS").as_deref() {
            Err(_) | Ok("portable") => Ok(Kernels::Portable),
            Ok("native") => Ok(Kernels::Native),
            Ok(other) => Err(format!(
                "SECTOR_KERNELS is {other:?}. Fix: set it to \"portable\" (the default) or \"native\", or unset it"
            )),
        })
        .clone()
        .map_err(candle_core::Error::Msg)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Portable => "portable",
            Kernels::Native => "native",
        }
    }
}

/// `a` (m, k) times `b` (k, n). Either may be a transposed view. On the CPU in
/// f32 or f64 and the portable mode, k is summed in blocks of at most
/// [`MAX_BLOCK`]; elsewhere this is candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let blocked =
        a.device().is_cpu() && matches!(a.dtype(), DType::F32 | DType::F64) && Kernels::current()? == Kernels::Portable;
    if blocked {
        a.apply_op2(b, BlockedMatmul)
    } else {
        a.matmul(b)
    }
}

struct BlockedMatmul;

impl CustomOp2 for BlockedMatmul {
    fn name(&self) -> &'static str {
        "blocked-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("blocked matmul: ({m}, {k}) times ({k2}, {n})");
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(blocked_gemm(a, l1, b, l2, m, n, k)),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(blocked_gemm(a, l1, b, l2, m, n, k)),
            _ => candle_core::bail!("blocked matmul takes two f32 or two f64 tensors"),
        };
        Ok((out, Shape::from((m, n))))
    }

    /// d(a b) = grad b^T for a and a^T grad for b, blocked the same way
    /// (the weight gradient is where k is large).
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(matmul(grad, &b.t()?)?), Some(matmul(&a.t()?, grad)?)))
    }
}

/// dst (m, n, row-major) = a b, k cut into blocks of at most MAX_BLOCK and
/// accumulated in order.
fn blocked_gemm<T: num_traits::Float + 'static>(
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<T> {
    let (a_rs, a_cs) = (la.stride()[0] as isize, la.stride()[1] as isize);
    let (b_rs, b_cs) = (lb.stride()[0] as isize, lb.stride()[1] as isize);
    let mut dst = vec![T::zero(); m * n];
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    for start in (0..k).step_by(MAX_BLOCK) {
        let block = MAX_BLOCK.min(k - start);
        let a_block = &a[la.start_offset() + start * a_cs as usize..];
        let b_block = &b[lb.start_offset() + start * b_rs as usize..];
        // Safety: the strides and offsets come from the tensors' layouts, so
        // every element gemm reads lies inside `a` and `b`; dst is m * n.
        unsafe {
            gemm::gemm(
                m,
                n,
                block,
                dst.as_mut_ptr(),
                1,
                n as isize,
                start > 0, // accumulate onto the earlier blocks
                a_block.as_ptr(),
                a_cs,
                a_rs,
                b_block.as_ptr(),
                b_cs,
                b_rs,
                T::one(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            )
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn sample(shape: (usize, usize), seed: f64) -> Tensor {
        let n = shape.0 * shape.1;
        let values: Vec<f32> = (0..n).map(|i| ((i as f64 * 0.37 + seed).sin() * 2.0) as f32).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn blocked(a: &Tensor, b: &Tensor) -> Tensor {
        a.apply_op2(b, BlockedMatmul).unwrap()
    }

    #[test]
    fn one_block_is_candles_matmul_bit_for_bit() {
        // k <= MAX_BLOCK: one gemm call, the one candle makes; also through
        // transposed views.
        let (a, b) = (sample((7, 300), 0.1), sample((300, 5), 0.2));
        assert_eq!(blocked(&a, &b).to_vec2::<f32>().unwrap(), a.matmul(&b).unwrap().to_vec2::<f32>().unwrap());
        let (at, bt) = (sample((300, 7), 0.3).t().unwrap(), sample((5, 300), 0.4).t().unwrap());
        assert_eq!(blocked(&at, &bt).to_vec2::<f32>().unwrap(), at.matmul(&bt).unwrap().to_vec2::<f32>().unwrap());
    }

    #[test]
    fn many_blocks_sum_to_the_product_and_match_an_explicit_block_sum() {
        let k = 2 * MAX_BLOCK + 77;
        let (a, b) = (sample((6, k), 0.5), sample((k, 9), 0.6));
        let got = blocked(&a, &b);
        let diff =
            (&got - a.matmul(&b).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-3, "blocked product off by {diff}");
        // The blocks are summed in order: (a0 b0 + a1 b1) + a2 b2, each one
        // gemm call of k <= 512, which candle's matmul also makes.
        let block = |i: usize| {
            let len = MAX_BLOCK.min(k - i * MAX_BLOCK);
            a.narrow(1, i * MAX_BLOCK, len).unwrap().matmul(&b.narrow(0, i * MAX_BLOCK, len).unwrap()).unwrap()
        };
        let explicit = ((block(0) + block(1)).unwrap() + block(2)).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), explicit.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn gradients_are_those_of_the_product() {
        let k = MAX_BLOCK + 40;
        let (a, b) = (Var::from_tensor(&sample((5, k), 0.7)).unwrap(), Var::from_tensor(&sample((k, 3), 0.8)).unwrap());
        let upstream = sample((5, 3), 0.9);
        let ours = (blocked(&a, &b) * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let theirs = (a.matmul(&b).unwrap() * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [a.as_tensor(), b.as_tensor()] {
            let (g1, g2) = (ours.get(var).unwrap(), theirs.get(var).unwrap());
            let diff = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-3, "gradient off by {diff}");
        }
    }
}
