"""How far the cached top-k KL is from the exact KL on the toy world.

On held-out replay sequences cached with `store_topk`, compare the exact per-token forward
KL(p_base || p_ft) (full vocabulary, base logits recomputed) with the coarsened top-k KL of
`KLFromCachedTopK` for several k, between the toy base and a fine-tuned toy model.
    python benchmarks/topk_kl_error.py [--finetuned runs/toy/demo/methods/ft/seed0/hf_model] [--sequences 200]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.data import Collator
from cfs_lightning.shards import load_shards, read_manifest
from cfs_lightning.training.losses import token_divergence
from cfs_lightning.training.regularizers import topk_forward_kl


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/toy/base")
    parser.add_argument("--finetuned", default="runs/toy/demo/methods/ft/seed0/hf_model")
    parser.add_argument("--replay", default="runs/toy/demo/data/cfs_replay")
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=25)
    args = parser.parse_args()
    stored = read_manifest(args.replay).get("store_topk", 0)
    if not stored:
        raise SystemExit(f"{args.replay} caches no top-k: regenerate it with --store_topk")
    base = AutoModelForCausalLM.from_pretrained(args.base).eval()
    ft = AutoModelForCausalLM.from_pretrained(args.finetuned).eval()
    tok = AutoTokenizer.from_pretrained(args.base)
    data = load_shards(args.replay)
    rows = [data[i] for i in range(len(data) - args.sequences, len(data))]  # the held-out end
    collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= stored]
    sums = {"exact": 0.0, "tail": 0.0, "cache_err": 0.0, **{k: 0.0 for k in ks}}
    count = 0
    for i in range(0, len(rows), args.batch_size):
        b = collate(rows[i: i + args.batch_size])
        valid = b["labels"][:, 1:] != -100
        ref = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        logits = ft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        ids, lp = b["topk_ids"][:, :-1], b["topk_logprobs"][:, :-1]
        sums["exact"] += token_divergence(logits, ref)[valid].sum().item()
        sums["tail"] += (1 - lp.exp().sum(-1))[valid].clamp(min=0).sum().item()
        recomputed = ref.log_softmax(-1).gather(-1, ids)
        sums["cache_err"] = max(sums["cache_err"], (recomputed - lp)[valid].abs().max().item())
        for k in ks:
            sums[k] += topk_forward_kl(logits, ids[..., :k], lp[..., :k])[valid].sum().item()
        count += valid.sum().item()
    exact = sums["exact"] / count
    print(f"{count} tokens of {len(rows)} held-out replay sequences; vocabulary {ref.size(-1)}; "
          f"cached top-{stored}; max |cached - recomputed| log-prob = {sums['cache_err']:.2e}")
    print(f"exact KL(p_base || p_ft) = {exact:.4f} nats/token; base mass outside the top-{stored}: "
          f"{sums['tail'] / count:.3f}\n")
    print("| k | top-k KL (nats/token) | top-k / exact | relative error |")
    print("|---|---|---|---|")
    for k in ks:
        approx = sums[k] / count
        print(f"| {k} | {approx:.4f} | {approx / exact:.3f} | {(exact - approx) / exact:.1%} |")


if __name__ == "__main__":
    main()
