"""Pretrain the project's tiny models (``tiny-opt``, ``tiny-llama``) on the offline corpus.

    python tools/pretrain_tiny.py --model tiny-opt --device cuda --out DIR

The architecture comes from ``conf/model/<model>.yaml`` (key ``architecture``); the data is the
``python-docs`` corpus tokenized with the shipped tokenizer. The output directory becomes a Hugging Face
checkpoint (float16 safetensors, config, tokenizer, model card ``README.md`` and ``metrics.json``).
Plain argparse, no Hydra: this runs on bare GPU images too. A repository tool, not part of the
installed package: it reads the repository's ``conf/``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import yaml
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from polar_sparsity.data.corpus import CORPUS_NAME, load_documents
from polar_sparsity.data.tokenizer import load_tokenizer, tokenizer_path
from polar_sparsity.models.families import build_hf_config, family_for_config

MAX_CHECKPOINT_BYTES = 8_000_000
_CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"  # tools/ sits beside conf/


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a file name under conf/model/ (tiny-opt, tiny-llama)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", type=Path, default=None, help="model yaml (default: conf/model/<model>.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override architecture keys")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --- model and data -----------------------------------------------------------------------------


def load_model_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(family, architecture) from the model yaml, with ``--set`` overrides applied."""
    spec = yaml.safe_load((args.config or _CONF_DIR / f"{args.model}.yaml").read_text())
    architecture = dict(spec["architecture"])
    for item in args.set:
        key, _, value = item.partition("=")
        architecture[key] = yaml.safe_load(value)
    return spec["family"], architecture


def build_model(family: str, architecture: dict[str, Any], seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(build_hf_config(family, architecture), dtype=torch.float32)


def token_stream(tokenizer: PreTrainedTokenizerFast, split: str) -> np.ndarray:
    """One split as a single token array: every document followed by ``<|endoftext|>``."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(load_documents(split), add_special_tokens=False)["input_ids"]
    return np.fromiter((t for doc in ids for t in [*doc, eos]), dtype=np.int64)


def eval_chunks(stream: np.ndarray, seq_len: int) -> list[torch.Tensor]:
    """The stream cut into consecutive sequences (the last one shorter); all but first tokens are scored."""
    return [torch.from_numpy(stream[i : i + seq_len]) for i in range(0, len(stream) - 1, seq_len)]


def train_batches(
    stream: np.ndarray, args: argparse.Namespace, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of packed sequences; each pass re-cuts the stream at a random offset."""
    while True:
        offset = int(rng.integers(args.seq_len))
        n = (len(stream) - offset) // args.seq_len
        seqs = stream[offset : offset + n * args.seq_len].reshape(n, args.seq_len)
        order = rng.permutation(n)
        for i in range(0, n - args.batch_size + 1, args.batch_size):
            yield torch.from_numpy(seqs[order[i : i + args.batch_size]])


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- training -----------------------------------------------------------------------------------


def autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def mean_nll(model: PreTrainedModel, chunks: list[torch.Tensor], device: torch.device, amp: bool) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted tokens of the chunks."""
    model.eval()
    total, count = 0.0, 0
    for batch in _equal_length_batches(chunks, 16):
        ids = batch.to(device)
        with autocast(device) if amp else nullcontext():
            logits = model(ids).logits
        targets = ids[:, 1:].flatten()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum").item()
        count += targets.numel()
    model.train()
    return total / count


def _equal_length_batches(chunks: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Consecutive chunks stacked in groups of ``size``; a chunk of another length starts a new group."""
    group: list[torch.Tensor] = []
    for chunk in chunks:
        if group and (len(group) == size or len(chunk) != len(group[0])):
            yield torch.stack(group)
            group = []
        group.append(chunk)
    if group:
        yield torch.stack(group)


def train(
    model: PreTrainedModel, train_stream: np.ndarray, val_chunks: list[torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """AdamW + warmup/cosine; returns the history and leaves the best-validation weights in ``model``."""
    device = torch.device(args.device)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    batches = train_batches(train_stream, args, np.random.default_rng(args.seed))
    history: list[dict[str, float]] = []
    best = {"val_loss": float("inf"), "step": 0, "state": None}
    start = time.perf_counter()
    for step in (bar := tqdm(range(args.steps), desc=f"pretrain {args.model}", mininterval=2.0)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ids = next(batches).to(device, non_blocking=True)
        with autocast(device):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = mean_nll(model, val_chunks, device, amp=True)
            history.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val})
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val:.3f}")
            if val < best["val_loss"]:  # the corpus is small: keep the weights from before any overfitting
                best = {"val_loss": val, "step": step + 1, "state": copy.deepcopy(model.state_dict())}
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    model.load_state_dict(best["state"])
    return {"history": history, "best_step": best["step"], "train_wall_s": wall}


# --- evaluation ---------------------------------------------------------------------------------


def unigram_nll(train_stream: np.ndarray, chunks: list[torch.Tensor], vocab_size: int) -> float:
    """Mean NLL of an add-one-smoothed unigram model from train counts, on the same predicted tokens."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([c[1:].numpy() for c in chunks])
    return float(-logp[targets].mean())


@contextmanager
def structure_hooks(model: PreTrainedModel) -> Iterator[dict[str, list[list[float]]]]:
    """Per layer, per forward: MLP activation density (ReLU models) and top-half head-norm share."""
    adapter = family_for_config(model.config)
    n_heads = model.config.num_attention_heads
    stats: dict[str, list[list[float]]] = {"density": [], "head_top_half_share": []}
    handles = []
    for layer in range(model.config.num_hidden_layers):
        stats["density"].append([])
        stats["head_top_half_share"].append([])

        def on_out_proj(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], layer: int = layer) -> None:
            x = inputs[0].float()
            norms = x.view(*x.shape[:-1], n_heads, -1).norm(dim=-1).sort(dim=-1, descending=True).values
            share = norms[..., : n_heads // 2].sum(-1) / norms.sum(-1).clamp_min(1e-12)
            stats["head_top_half_share"][layer].append(share.mean().item())

        def on_down_proj(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], layer: int = layer) -> None:
            stats["density"][layer].append((inputs[0] > 0).float().mean().item())

        handles.append(adapter.attn_out_proj(model, layer).register_forward_pre_hook(on_out_proj))
        if model.config.model_type == "opt":  # only a ReLU MLP has exact zeros
            handles.append(adapter.mlp_down_proj(model, layer).register_forward_pre_hook(on_down_proj))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def evaluate_checkpoint(
    out: Path,
    train_stream: np.ndarray,
    val_chunks: list[torch.Tensor],
    test_chunks: list[torch.Tensor],
    device: str,
) -> dict[str, Any]:
    """Metrics of the SAVED float16 weights, evaluated in float32: what a user loading the checkpoint gets."""
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device)
    with structure_hooks(model) as stats:
        val = mean_nll(model, val_chunks, torch.device(device), amp=False)
    test = mean_nll(model, test_chunks, torch.device(device), amp=False)
    uni = unigram_nll(train_stream, val_chunks, model.config.vocab_size)
    # Hook means are over evaluation batches; all batches but the last hold 16 full-length sequences.
    layer_mean = [round(float(np.mean(v)), 4) for v in stats["head_top_half_share"]]
    metrics = {
        "val_perplexity": math.exp(val),
        "test_perplexity": math.exp(test),
        "unigram_val_perplexity": math.exp(uni),
        "val_tokens": sum(len(c) - 1 for c in val_chunks),
        "test_tokens": sum(len(c) - 1 for c in test_chunks),
        "head_top_half_norm_share_per_layer": layer_mean,
    }
    if stats["density"][0]:
        metrics["relu_density_per_layer"] = [round(float(np.mean(v)), 4) for v in stats["density"]]
    return metrics


# --- saving -------------------------------------------------------------------------------------


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """float16 safetensors + config + tokenizer; float16 halves the size so it fits the 8 MB budget."""
    if out.exists():
        shutil.rmtree(out)
    model = model.to("cpu").half()
    model.config.dtype = torch.float16
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def checkpoint_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"


def model_card(model_name: str, family: str, architecture: dict[str, Any], report: dict[str, Any]) -> str:
    m, t = report["metrics"], report["training"]
    heads = ", ".join(f"{x:.3f}" for x in m["head_top_half_norm_share_per_layer"])
    rows = [
        f"| validation perplexity | {m['val_perplexity']:.2f} |",
        f"| test perplexity | {m['test_perplexity']:.2f} |",
        f"| unigram baseline perplexity (add-one, train counts) | {m['unigram_val_perplexity']:.2f} |",
        f"| head output-norm share of the top 50% heads, per layer (uniform = 0.5) | {heads} |",
    ]
    if "relu_density_per_layer" in m:
        dens = ", ".join(f"{x:.3f}" for x in m["relu_density_per_layer"])
        rows.append(f"| ReLU activation density (fraction of fc2 inputs > 0), per layer | {dens} |")
    arch = "\n".join(f"- `{k}`: {v}" for k, v in architecture.items())
    return f"""---
library_name: transformers
license: apache-2.0
pipeline_tag: text-generation
---

# {model_name}

A tiny {family.upper()} decoder pretrained by the polar-sparsity project on its offline corpus
(`{CORPUS_NAME}`: CPython's `pydoc_data.topics` and standard-library docstrings, frozen in
`polar_sparsity/assets/corpus/`). It is the project's offline default model: it exists so that
activation collection, router training, evaluation and kernels can be tested end to end without
downloads. **It is for pipeline testing, not for real use**: it knows a little about Python's
documentation and nothing else.

## Architecture

Family `{family}`, built from `conf/model/{model_name}.yaml`:

{arch}

Weights are stored in float16 ({report["checkpoint_bytes"]:,} bytes for the whole directory). The
tokenizer is the project's byte-level BPE (vocabulary 2048, `<|endoftext|>` = 0 as bos/eos,
`<pad>` = 1), trained on the corpus's train split.

## Training

- command: `{t["command"]}`
- {t["steps"]} steps of {t["batch_size"]} packed sequences x {t["seq_len"]} tokens =
  {t["tokens_seen"]:,} tokens seen ({t["epochs"]:.1f} passes over the {t["train_tokens"]:,}-token train split;
  documents joined with `<|endoftext|>`); AdamW (lr {t["lr"]}, warmup {t["warmup"]}, cosine to
  {t["min_lr_ratio"]} x lr, weight decay {t["weight_decay"]}), {t["precision"]}, seed {t["seed"]}
- the weights kept are those with the best validation loss (step {t["best_step"]}), checked every
  {t["eval_every"]} steps
- device: {t["device"]}; training wall time {t["train_wall_s"]:.1f} s; date {t["date"]}
- software: torch {t["torch"]}, transformers {t["transformers"]}

## Evaluation

Float32 evaluation of the saved float16 weights, on the corpus's validation ({m["val_tokens"]:,} predicted
tokens) and test ({m["test_tokens"]:,}) splits, cut into {t["seq_len"]}-token sequences. Structure figures
come from forward hooks on the validation set: per token, the per-head L2 norms of the attention output
projection's input are sorted and the top half's share of their sum is averaged.

| metric | value |
|---|---|
{chr(10).join(rows)}

`metrics.json` beside this file holds the same numbers and the validation-loss history.
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    family, architecture = load_model_spec(args)
    tokenizer = load_tokenizer()
    if len(tokenizer) != architecture["vocab_size"]:
        raise ValueError(f"tokenizer at {tokenizer_path()} has {len(tokenizer)} tokens, model expects "
                         f"{architecture['vocab_size']}")  # fmt: skip
    streams = {split: token_stream(tokenizer, split) for split in ("train", "validation", "test")}
    val_chunks = eval_chunks(streams["validation"], args.seq_len)
    model = build_model(family, architecture, args.seed)
    result = train(model, streams["train"], val_chunks, args)
    save_checkpoint(model, tokenizer, args.out)
    metrics = evaluate_checkpoint(
        args.out, streams["train"], val_chunks, eval_chunks(streams["test"], args.seq_len), args.device
    )
    training = training_record(args, argv, len(streams["train"]), result)
    report = {"model": args.model, "family": family, "metrics": metrics, "training": training,
              "history": result["history"]}  # fmt: skip
    write_report(args.out, args.model, family, architecture, report)


def training_record(
    args: argparse.Namespace, argv: list[str] | None, train_tokens: int, result: dict[str, Any]
) -> dict[str, Any]:
    """How the model was trained, for the card: exact command, data volume, device, software."""
    tokens_seen = args.steps * args.batch_size * args.seq_len
    command = ["python tools/pretrain_tiny.py", *(sys.argv[1:] if argv is None else argv)]
    return {
        **{k: v for k, v in vars(args).items() if k not in ("out", "config", "set")},
        "command": " ".join(command),
        "architecture_overrides": args.set,
        "tokens_seen": tokens_seen,
        "train_tokens": train_tokens,
        "epochs": tokens_seen / train_tokens,
        "precision": "bf16 autocast" if args.device.startswith("cuda") else "float32",
        "device": device_name(args.device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "best_step": result["best_step"],
        "train_wall_s": result["train_wall_s"],  # the training loop, periodic validation included
    }


def write_report(out: Path, model_name: str, family: str, architecture: dict[str, Any], report: dict) -> None:
    """metrics.json and README.md; the size check covers both, since they ship in the checkpoint."""
    # The card states the directory size, which includes the card: rewrite until the number is exact.
    size = -1
    while report.get("checkpoint_bytes") != size:
        report["checkpoint_bytes"] = size
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "README.md").write_text(model_card(model_name, family, architecture, report))
        size = checkpoint_bytes(out)
    if size > MAX_CHECKPOINT_BYTES:
        raise RuntimeError(f"checkpoint {out} is {size} bytes, over the {MAX_CHECKPOINT_BYTES}-byte budget")
    m = report["metrics"]
    print(json.dumps({"out": str(out), "bytes": size, **m}, indent=2))


if __name__ == "__main__":
    main()
