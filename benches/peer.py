"""The peer of `sector bench`: the same cases in PyTorch + Hugging Face
transformers, as a researcher would otherwise run them.

`sector bench --peer "PYTHON benches/peer.py"` (what `make bench` does) calls
this once per case, right after measuring sector on it, so the two are
measured interleaved in one run. It prints one JSON line:
{"case": ..., "tokens_per_s": ...}.

Same configs (random init, f32, vocabulary 384, gated-gelu, untied head),
same shapes (source 40; training batch x target; greedy decoding of exactly
64 new tokens with the key/value cache), same thread count, one warm-up run,
then the median of --reps runs.
"""

import argparse
import json
import statistics
import time
import warnings

warnings.filterwarnings("ignore")  # transformers' deprecation notices would clutter the table

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

transformers.logging.set_verbosity_error()

PRESETS = {
    "cpu-small": dict(d_model=256, d_ff=512, num_heads=4, d_kv=64, num_layers=4, num_decoder_layers=2),
    "cpu-medium": dict(d_model=512, d_ff=1024, num_heads=8, d_kv=64, num_layers=6, num_decoder_layers=4),
}
SRC_LEN = 40
NEW_TOKENS = 64


def parse_case(name):
    """'train cpu-small b32x300' or 'decode cpu-small b256 +64'."""
    kind, preset, shape = name.split()[:3]
    if kind == "train":
        batch, tgt = shape[1:].split("x")
        return kind, preset, int(batch), int(tgt)
    return kind, preset, int(shape[1:]), NEW_TOKENS


def model_for(preset):
    config = T5Config(
        vocab_size=384,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        **PRESETS[preset],
    )
    model = T5ForConditionalGeneration(config)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr(), "lm_head is tied: not ByT5"
    return model


def median_seconds(reps, run):
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kind, preset, batch, tgt = parse_case(args.case)
    model = model_for(preset)
    inputs = torch.randint(3, 259, (batch, SRC_LEN))
    mask = torch.ones_like(inputs)
    if kind == "train":
        model.train()
        labels = torch.randint(3, 259, (batch, tgt))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        seconds = median_seconds(args.reps, step)
    else:
        model.eval()

        def decode():
            with torch.no_grad():
                model.generate(
                    input_ids=inputs,
                    attention_mask=mask,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    num_beams=1,
                )

        seconds = median_seconds(args.reps, decode)
    print(json.dumps({"case": args.case, "tokens_per_s": batch * tgt / seconds}))


if __name__ == "__main__":
    main()
