//! The ByT5 byte tokenizer (PROTOCOL.md section 1).
//!
//! Every UTF-8 byte is one token: id = byte + 3. Ids 0, 1 and 2 are pad, eos
//! and unk; 259..383 are ByT5's unused extra ids. Like the Hugging Face
//! tokenizer, encoding appends eos; the decoder starts from pad.

use candle_core::{Device, Tensor};

pub const PAD: u32 = 0;
pub const EOS: u32 = 1;
pub const UNK: u32 = 2;
/// Byte b has id b + BYTE_OFFSET.
pub const BYTE_OFFSET: u32 = 3;
pub const VOCAB_SIZE: usize = 384;
/// The first token fed to the decoder.
pub const DECODER_START: u32 = PAD;

/// Token ids of `text`, followed by eos.
pub fn encode(text: &str) -> Vec<u32> {
    text.bytes().map(|b| b as u32 + BYTE_OFFSET).chain(std::iter::once(EOS)).collect()
}

/// The text of `ids` up to the first eos. Pads are skipped; special and extra
/// ids that are not bytes are dropped; invalid UTF-8 is replaced, so any model
/// output decodes to some string.
pub fn decode(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .take_while(|&&id| id != EOS)
        .filter(|&&id| (BYTE_OFFSET..BYTE_OFFSET + 256).contains(&id))
        .map(|&id| (id - BYTE_OFFSET) as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A batch of sequences padded on the right to a common length.
pub struct PaddedBatch {
    /// (batch, len) u32 token ids, PAD after each row's end.
    pub ids: Tensor,
    /// (batch, len) f32, 1 on real tokens and 0 on padding.
    pub mask: Tensor,
    /// Each row's unpadded length.
    pub lengths: Vec<usize>,
}

/// Pads `seqs` to the longest one (at least one column, so that an empty
/// batch row still has a shape).
pub fn pad_batch(seqs: &[Vec<u32>], device: &Device) -> candle_core::Result<PaddedBatch> {
    let len = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut mask = Vec::with_capacity(seqs.len() * len);
    for seq in seqs {
        ids.extend_from_slice(seq);
        ids.resize(ids.len() + len - seq.len(), PAD);
        mask.extend(std::iter::repeat_n(1f32, seq.len()));
        mask.extend(std::iter::repeat_n(0f32, len - seq.len()));
    }
    let shape = (seqs.len(), len);
    Ok(PaddedBatch {
        ids: Tensor::from_vec(ids, shape, device)?,
        mask: Tensor::from_vec(mask, shape, device)?,
        lengths: seqs.iter().map(Vec::len).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_byt5_ids() {
        // "Q:" is 0x51 0x3a; ByT5 shifts bytes by 3 and appends eos.
        assert_eq!(encode("Q:"), vec![0x51 + 3, 0x3a + 3, EOS]);
        assert_eq!(encode("\n"), vec![10 + 3, EOS]);
        assert_eq!(encode(""), vec![EOS]);
    }

    #[test]
    fn decode_stops_at_eos_and_skips_pad() {
        let mut ids = encode("A: 12");
        ids.extend(encode("junk"));
        assert_eq!(decode(&ids), "A: 12");
        assert_eq!(decode(&[PAD, 0x41 + 3, PAD]), "A");
        assert_eq!(decode(&[UNK, 300, 383, 0x42 + 3]), "B");
    }

    #[test]
    fn decode_never_fails_on_bad_utf8() {
        assert_eq!(decode(&[0xff + 3, 0x41 + 3]), "\u{fffd}A");
    }

    #[test]
    fn pad_batch_pads_right_and_masks() -> candle_core::Result<()> {
        let b = pad_batch(&[vec![5, 6, 1], vec![7, 1]], &Device::Cpu)?;
        assert_eq!(b.ids.to_vec2::<u32>()?, vec![vec![5, 6, 1], vec![7, 1, 0]]);
        assert_eq!(b.mask.to_vec2::<f32>()?, vec![vec![1., 1., 1.], vec![1., 1., 0.]]);
        assert_eq!(b.lengths, vec![3, 2]);
        Ok(())
    }
}
