//! Data parallelism: one process per GPU (a rank), each with the whole
//! model and the same seed-derived data.
//!
//! Training: every rank computes the gradient of its share of each batch's
//! micro-batches; the shares are summed across ranks (each already divided
//! by the whole batch's token count, so the sum is the batch's mean-loss
//! gradient) and every rank takes the same optimiser step. Generation: every
//! rank decodes its share of the decoding chunks and the outputs are
//! gathered in chunk order. Chunks and micro-batches are cut the same way
//! whatever the number of ranks, so generated data does not depend on it and
//! weights depend on it only through the order of one float sum.
//!
//! Between GPUs the sums go through NCCL (feature `nccl`); `ThreadRanks`
//! runs the same code with ranks as threads of one process, which is how the
//! tests check the data-parallel path on a CPU.

use candle_core::{DType, Device, Result, Tensor};
use std::sync::{Arc, Barrier, Mutex};

/// The ranks of a data-parallel job, as seen from one of them.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum of `tensor` over all ranks, in rank order. Every
    /// rank must call it, in the same order, with tensors of the same shape.
    fn sum(&self, tensor: &Tensor) -> Result<Tensor>;
}

/// Whether the item at `index` of a list cut the same way on every rank is
/// this rank's to compute.
pub fn is_mine(collective: &dyn Collective, index: usize) -> bool {
    index % collective.world_size() == collective.rank()
}

/// Waits until every rank gets here.
pub fn barrier(collective: &dyn Collective) -> Result<()> {
    if collective.world_size() > 1 {
        collective.sum(&Tensor::zeros(1, DType::F32, &Device::Cpu)?)?;
    }
    Ok(())
}

/// Every rank's `items` as (index, text) pairs, gathered into one list
/// ordered by index on every rank. Texts travel as bytes in an f32 tensor
/// (exact for 0..=255), one row per rank, through two sums: the row lengths,
/// then the rows.
pub fn gather_texts(collective: &dyn Collective, items: Vec<(usize, String)>) -> Result<Vec<(usize, String)>> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(items);
    }
    let rank = collective.rank();
    let payload = serde_json::to_vec(&items).expect("serialises");
    let mut lengths = vec![0f32; world];
    lengths[rank] = payload.len() as f32;
    let lengths: Vec<usize> =
        collective.sum(&Tensor::new(lengths, &Device::Cpu)?)?.to_vec1::<f32>()?.iter().map(|&l| l as usize).collect();
    let width = lengths.iter().copied().max().unwrap_or(0).max(1);
    let mut rows = vec![0f32; world * width];
    for (slot, &byte) in rows[rank * width..].iter_mut().zip(&payload) {
        *slot = byte as f32;
    }
    let rows = collective.sum(&Tensor::from_vec(rows, (world, width), &Device::Cpu)?)?.to_vec2::<f32>()?;
    let mut gathered: Vec<(usize, String)> = Vec::new();
    for (row, &length) in rows.iter().zip(&lengths) {
        let bytes: Vec<u8> = row[..length].iter().map(|&b| b as u8).collect();
        let part: Vec<(usize, String)> = serde_json::from_slice(&bytes)
            .map_err(|e| candle_core::Error::Msg(format!("gathered texts do not parse: {e}")))?;
        gathered.extend(part);
    }
    gathered.sort_by_key(|(index, _)| *index);
    Ok(gathered)
}

/// A job of one rank: sums are the tensor itself.
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn sum(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.clone())
    }
}

/// Ranks as threads of one process, summing through shared memory: the CPU
/// stand-in for NCCL with which the tests run the data-parallel path.
pub struct ThreadRanks {
    rank: usize,
    shared: Arc<SharedSlots>,
}

struct SharedSlots {
    world_size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Option<Tensor>>>,
}

impl ThreadRanks {
    /// One handle per rank; give each to its own thread.
    pub fn group(world_size: usize) -> Vec<ThreadRanks> {
        let shared = Arc::new(SharedSlots {
            world_size,
            barrier: Barrier::new(world_size),
            slots: Mutex::new(vec![None; world_size]),
        });
        (0..world_size).map(|rank| ThreadRanks { rank, shared: shared.clone() }).collect()
    }
}

impl Collective for ThreadRanks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world_size
    }
    fn sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.shared.slots.lock().expect("no rank panicked")[self.rank] = Some(tensor.clone());
        // Every slot is filled after the first wait; nobody overwrites one
        // for the next sum before everyone has read this one.
        self.shared.barrier.wait();
        let slots = self.shared.slots.lock().expect("no rank panicked").clone();
        self.shared.barrier.wait();
        let mut parts = slots.into_iter().map(|slot| slot.expect("every rank wrote its slot"));
        let first = parts.next().expect("at least one rank");
        parts.try_fold(first, |sum, part| sum + part.to_device(tensor.device())?)
    }
}

#[cfg(feature = "nccl")]
pub use nccl::{NcclId, NcclRanks};

#[cfg(feature = "nccl")]
mod nccl {
    use super::Collective;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
    use std::rc::Rc;

    /// The NCCL unique id the launcher makes and hands to every rank, as hex.
    pub struct NcclId(pub Id);

    impl NcclId {
        pub fn new() -> Result<Self> {
            Id::new().map(NcclId).map_err(|e| candle_core::Error::Msg(format!("ncclGetUniqueId: {e:?}")))
        }

        pub fn to_hex(&self) -> String {
            self.0.internal().iter().map(|&b| format!("{:02x}", b as u8)).collect()
        }

        pub fn from_hex(hex: &str) -> Result<Self> {
            let bad = || candle_core::Error::Msg(format!("NCCL id {hex:?} is not 256 hex digits"));
            let mut internal = [0 as std::ffi::c_char; 128];
            if hex.len() != 256 {
                return Err(bad());
            }
            for (i, slot) in internal.iter_mut().enumerate() {
                *slot = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())? as std::ffi::c_char;
            }
            Ok(NcclId(Id::uninit(internal)))
        }
    }

    /// This process's rank of a job on several GPUs of one machine.
    pub struct NcclRanks {
        comm: Rc<Comm>,
        device: Device,
    }

    // One rank is one process with one thread driving its GPU; the
    // communicator never crosses threads.
    unsafe impl Send for NcclRanks {}
    unsafe impl Sync for NcclRanks {}

    impl NcclRanks {
        /// Joins the job as `rank` on GPU `rank` (blocks until all ranks join).
        pub fn join(rank: usize, world_size: usize, id: &NcclId) -> Result<Self> {
            let device = Device::new_cuda(rank)?;
            let stream = device.as_cuda_device()?.cuda_stream();
            let comm = Comm::from_rank(stream, rank, world_size, id.0)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL rank {rank} of {world_size}: {e:?}")))?;
            Ok(NcclRanks { comm: Rc::new(comm), device })
        }
    }

    impl Collective for NcclRanks {
        fn rank(&self) -> usize {
            self.comm.rank()
        }
        fn world_size(&self) -> usize {
            self.comm.world_size()
        }
        fn sum(&self, tensor: &Tensor) -> Result<Tensor> {
            let on_gpu = tensor.to_device(&self.device)?.to_dtype(DType::F32)?.contiguous()?;
            let summed = on_gpu.apply_op1_no_bwd(&AllReduceSum { comm: self.comm.clone() })?;
            summed.to_dtype(tensor.dtype())?.to_device(tensor.device())
        }
    }

    struct AllReduceSum {
        comm: Rc<Comm>,
    }

    unsafe impl Send for AllReduceSum {}
    unsafe impl Sync for AllReduceSum {}

    impl CustomOp1 for AllReduceSum {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("NCCL sums tensors on a GPU")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let send = storage.as_cuda_slice::<f32>()?;
            let send = match layout.contiguous_offsets() {
                Some((start, end)) => send.slice(start..end),
                None => candle_core::bail!("all-reduce needs a contiguous tensor"),
            };
            let device = storage.device().clone();
            let mut receive = device.cuda_stream().alloc_zeros::<f32>(send.len()).map_err(candle_core::Error::wrap)?;
            self.comm
                .all_reduce(&send, &mut receive, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(receive, device), layout.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ranks_sum_in_rank_order_and_gather_texts_by_index() {
        let ranks = ThreadRanks::group(3);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|ranks| {
                    scope.spawn(move || {
                        let r = ranks.rank();
                        let mine = Tensor::new(&[r as f32, 10.0 * r as f32], &Device::Cpu).unwrap();
                        let sum = ranks.sum(&mine).unwrap().to_vec1::<f32>().unwrap();
                        // Rank r owns indices r, r + 3, ...; texts of different lengths, one with a newline.
                        let texts = (0..7).filter(|&i| is_mine(ranks, i)).map(|i| (i, "é\n".repeat(i))).collect();
                        (sum, gather_texts(ranks, texts).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected: Vec<(usize, String)> = (0..7).map(|i| (i, "é\n".repeat(i))).collect();
        for (sum, texts) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(texts, expected);
        }
    }
}
