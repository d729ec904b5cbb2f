"""Spliced-in evaluation of a multimodal language model's dictionary, one batch, two ways in the same run:

- before: five full passes, each through the vision tower and every language-model layer, projecting every
  position onto the vocabulary (the clean logits, a second clean pass for the dictionary's activations, then the
  zero, spliced and error runs);
- now (`evaluate.splice.SpliceBatch.run`, what the evaluator runs): the vision tower once (`lm_input`), one
  clean pass that caches the activations, the zero, spliced and error runs resumed at the dictionary's layer
  (`resume`), the logits of the scored positions only (`logits_at`).

Random weights (no download), random images at the model's input size with the default prompt, a random TopK
SAE on the residual stream at half depth of the language model, spliced in at the image tokens. Prints the
seconds (wall and CPU) of each way, their ratio and the largest difference between their scored logits.

    .venv/bin/python benchmarks/lmm_splice.py                                  # the 0.5 B LLaVA-OneVision
    .venv/bin/python benchmarks/lmm_splice.py --model hf-qwen2-vl-2b-instruct --images 1
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from prisma_ray.evaluate.splice import (
    SpliceBatch,
    classifier_head,
    next_token_readout,
    resume_point,
    splice_hooks,
)
from prisma_ray.models import TokenKind, get_entry, load_model
from prisma_ray.models.inputs import DEFAULT_PROMPT
from prisma_ray.sae import Dictionary, DictionaryConfig, Site, Sites

MODES = ("zero", "sae", "error")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf-llava-onevision-qwen2-0.5b-ov", help="a multimodal registry entry")
    parser.add_argument("--images", type=int, default=2, help="images in the batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entry = get_entry(args.model)
    start = time.perf_counter()
    model = load_model(entry, pretrained=False, seed=0)
    print(f"{entry.name}: built in {time.perf_counter() - start:.0f} s")
    size = entry.image_size
    images = list(np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), dtype=np.uint8))
    x = model.encode(images, [DEFAULT_PROMPT] * args.images)
    layout = model.multimodal_layout(x)
    readout, labels = next_token_readout(
        x["input_ids"], x["attention_mask"], torch.from_numpy(layout.kind == TokenKind.TEXT)
    )
    patches = torch.from_numpy(layout.kind == TokenKind.PATCH)
    hook = f"lm.blocks.{model.lm_n_layers // 2}.hook_resid_post"
    sites = Sites(inputs=(Site(name=hook, width=model.lm_d_model, model=entry.name),))
    d = Dictionary(DictionaryConfig(architecture="topk", k=4, d_sae=2 * model.lm_d_model), sites).eval()
    print(f"{args.images} images, {x['input_ids'].shape[1]} tokens each, {int(readout.sum())} scored; SAE at {hook}")

    with torch.inference_mode():
        before, old = timed(lambda: run_before(model, d, x, hook, readout, patches))
        now, new = timed(lambda: run_now(model, d, x, hook, labels, readout, patches))
    diff = max(float((old[m] - new[m]).abs().max()) for m in old)
    for name, (wall, cpu) in (("before", before), ("now", now)):
        print(f"{name:<7} wall {wall:7.1f} s   cpu {cpu:7.1f} s")
    print(
        f"ratio   wall {before[0] / now[0]:.2f}x   cpu {before[1] / now[1]:.2f}x; largest logit difference {diff:.2e}"
    )
    return 0


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def run_before(model, d, x, hook, readout, patches) -> dict[str, torch.Tensor]:
    logits = {"clean": model(x)[readout]}
    _, clean = model.run_with_cache(x, [hook], stop_early=True)
    for mode in MODES:
        with model.hooks(splice_hooks(d, patches, mode, clean)):
            logits[mode] = model(x)[readout]
    return logits


def run_now(model, d, x, hook, labels, readout, patches) -> dict[str, torch.Tensor]:
    batch = SpliceBatch(x, labels, None, readout=readout, lm_x=model.lm_input(x))
    hooks = [hook, *filter(None, [resume_point(model, [hook])])]
    batch.clean_logits, batch.clean = model.run_with_cache(batch.input(model, hooks), hooks, logits_at=readout)
    logits = {"clean": batch.clean_logits}
    for mode in MODES:
        logits[mode] = batch.run(model, classifier_head, splice_hooks(d, patches, mode, batch.clean))
    return logits


if __name__ == "__main__":
    sys.exit(main())
