"""One KARMA training step (forward, backward, AdamW) with the fused ops vs the same model in plain PyTorch.

The model is built from stable public pieces, following the recipe in the README: a random-init HF
``LlamaForCausalLM`` (tied LM head) as the backbone; items embedded as the mean of their text's token embeddings
through an MLP; a user's history enters as one soft token per item, then an interest token whose final state,
projected and normalised, is the interest embedding h. All three objectives are on:

  action          softmax contrastive loss of h against [the B clicked items; the B x 9 hard negatives], false
                  negatives (the positive's item id again) masked
  generation      LM loss of the next item's text after [history, interest]
  reconstruction  LM loss of the same text decoded from [projector(h), text] (gradient reaches h)

variants:
  fused    karma_kernels: ``contrastive_loss``; both LM objectives in one ``weighted_linear_cross_entropy`` call
           on the tied head (each objective's mean kept by per-token weights; as karma/losses.py does), backend
           "auto": the chunked torch path on CPU (one [V, D] weight gradient held from forward to backward, not
           one per objective), the Triton kernels on CUDA
  unfused  plain PyTorch: ``q @ k.T`` logits + ``F.cross_entropy``; ``F.cross_entropy`` over the materialised
           [tokens, V] logits of ``F.linear(states, lm_head.weight)``

Realistic shapes (default): V = 32000 and 128000 (a Llama-3-sized vocabulary), hidden 512, 2 layers, 64 users
x history 50, 16 text tokens per item (1024 tokens per LM objective). On CUDA both variants run under bf16
autocast. Targets (read off the results, never asserted): CPU, V=128000: fused peak memory <= 1/3 of unfused,
time <= 1.0x; GPU: fused >= 1.5x faster at <= 1/3 of the memory.

Two ways to run it:
  pytest bench/bench_train_step.py --benchmark-only   (pytest-benchmark cases, as every bench file;
                                                      KARMA_BENCH_QUICK=1: a tiny shape)
  python -m bench.bench_train_step [--vocab 32000 128000] [--rounds 3]
      both variants side by side in one process, alternating each round (the order flips every round), one
      warm-up step each; prints a markdown table of median step time and peak memory (CPU: the growth of the
      resident set during the step, bench/_mem.py; CUDA: the allocator's high-water mark above what was
      allocated before the step; either way with the previous step's gradients dropped first, so the step's own
      gradients count) and the fused / unfused ratios. --live (CPU) adds the allocator-level live peak of one more
      step of each, from the profiler's allocation events (bench/_mem.py live_peak_bytes; slow).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.conftest import DEVICE, QUICK, run_case
from karma_kernels import contrastive_loss
from karma_kernels.linear_ce.weighted import mean_objectives_on_one_head

VARIANTS = ("unfused", "fused")
PAD_ID = 0
TEMPERATURE = 0.05
GENERATION_WEIGHT = RECONSTRUCTION_WEIGHT = 0.5


@dataclass(frozen=True)
class StepShape:
    vocab: int = 32000
    hidden: int = 512
    layers: int = 2
    heads: int = 8
    intermediate: int = 1536
    embed_dim: int = 256          # item / interest embedding size
    users: int = 64               # batch
    history: int = 50             # clicked items per user, one soft token each
    text_len: int = 16            # tokens of an item's text
    negatives: int = 9            # hard negatives (shown, not clicked) per user
    catalog: int = 20000          # items

    def describe(self) -> str:
        return (f"V={self.vocab},D={self.hidden},layers={self.layers},B={self.users},H={self.history},"
                f"L={self.text_len}")


TINY = StepShape(vocab=500, hidden=32, layers=2, heads=4, intermediate=64, embed_dim=16, users=6, history=5,
                 text_len=4, negatives=3, catalog=200)


class KarmaStepModel(nn.Module):
    """The KARMA model of the README at a chosen shape: HF Llama backbone, item tower, interest head, prefix
    projector. ``losses(batch, fused)`` computes the three objectives with the fused ops or plain PyTorch."""

    def __init__(self, shape: StepShape, seed: int = 0):
        super().__init__()
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                             num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                             num_key_value_heads=shape.heads,
                             max_position_embeddings=shape.history + 2 * shape.text_len + 8,
                             tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
        self.shape = shape
        self.backbone = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        hidden, embed = shape.hidden, shape.embed_dim
        self.item_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed))
        self.item_to_token = nn.Linear(embed, hidden)
        self.interest_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.interest_head = nn.Linear(hidden, embed)
        self.prefix_projector = nn.Sequential(nn.Linear(embed, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        generator = torch.Generator().manual_seed(seed)
        # item texts: ids in [3, V) (0-2 are pad / bos / eos), so every step touches the whole vocabulary's range
        self.register_buffer("item_tokens", torch.randint(3, shape.vocab, (shape.catalog, shape.text_len),
                                                          generator=generator), persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.backbone.get_output_embeddings().weight

    def decode(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.backbone.model(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state

    def embeddings(self, item_ids: torch.Tensor, text: torch.Tensor):
        """(item embeddings [I, E], token embeddings of ``text`` [B, L, D]) from one lookup of the tied table
        (both variants): an item is the mean of its text's token embeddings (through the item MLP), a text token
        its own row. One embedding_bag with a sparse gradient: no dense [V, D] gradient per lookup, no
        [items, L, D] gathered rows in the forward, one sparse gradient to add into the head's."""
        tokens = self.item_tokens[item_ids]
        n_items, length = tokens.shape
        ids = torch.cat([tokens.reshape(-1), text.reshape(-1)])
        offsets = torch.cat([torch.arange(n_items, device=ids.device) * length,
                             n_items * length + torch.arange(text.numel(), device=ids.device)])
        per_sample = torch.cat([torch.full((tokens.numel(),), 1.0 / length, device=ids.device),
                                torch.ones(text.numel(), device=ids.device)])
        table = self.backbone.get_input_embeddings().weight
        rows = F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=per_sample.to(table.dtype),
                               sparse=True)
        items = F.normalize(self.item_mlp(rows[:n_items]).float(), dim=-1)
        return items, rows[n_items:].reshape(*text.shape, -1)

    def losses(self, batch: Dict[str, torch.Tensor], fused: bool) -> Dict[str, torch.Tensor]:
        # the LM head's use of the tied weight goes through a node made before the embedding lookups, so that
        # its dense [V, D] gradient reaches the weight after their sparse ones and takes them in place (autograd
        # adds a sparse gradient arriving after a dense one out of place: a second [V, D] buffer)
        weight = _GradientLast.apply(self.lm_head_weight)
        users, history = batch["history"].shape
        items = torch.cat([batch["history"].reshape(-1), batch["target"], batch["negatives"].reshape(-1)])
        text = self.item_tokens[batch["target"]]                 # the next item's text [B, L]
        item_emb, text_emb = self.embeddings(items, text)
        history_emb = item_emb[:users * history].reshape(users, history, -1)
        keys = item_emb[users * history:]                        # [clicked items; hard negatives]
        key_ids = items[users * history:]

        soft = self.item_to_token(history_emb.to(self.item_to_token.weight.dtype))
        interest = self.interest_token.to(soft.dtype).expand(users, 1, -1)
        states = self.decode(torch.cat([soft, interest, text_emb.to(soft.dtype)], dim=1))
        h = F.normalize(self.interest_head(states[:, history]).float(), dim=-1)
        # the state at <interest> predicts w_1, the state at w_l predicts w_{l+1}
        generation_states = states[:, history:history + self.shape.text_len]
        prefix = self.prefix_projector(h.to(self.prefix_projector[0].weight.dtype)).unsqueeze(1)
        reconstruction_states = self.decode(torch.cat([prefix, text_emb.to(prefix.dtype)], dim=1))

        if fused:
            action = contrastive_loss(h, keys, key_ids=key_ids, temperature=TEMPERATURE)
            # the reconstruction state at [prefix, w_1..w_{L-1}] predicts w_1..w_L (prefix_len = 1)
            lm_total, (generation, reconstruction) = mean_objectives_on_one_head(
                (generation_states.reshape(-1, generation_states.shape[-1]),
                 reconstruction_states[:, :-1].reshape(-1, reconstruction_states.shape[-1])),
                weight, text.reshape(-1), (GENERATION_WEIGHT, RECONSTRUCTION_WEIGHT), ignore_index=PAD_ID)
            total = action + lm_total
        else:
            logits = h @ keys.float().T / TEMPERATURE
            positive = torch.arange(users, device=h.device)
            columns = torch.arange(keys.shape[0], device=h.device)
            false_negative = (key_ids[None, :] == key_ids[:users, None]) & (columns[None, :] != positive[:, None])
            action = F.cross_entropy(logits.masked_fill(false_negative, float("-inf")), positive)
            generation = F.cross_entropy(F.linear(generation_states, weight).flatten(0, 1).float(),
                                         text.reshape(-1), ignore_index=PAD_ID)
            reconstruction = F.cross_entropy(F.linear(reconstruction_states[:, :-1], weight).flatten(0, 1).float(),
                                             text.reshape(-1), ignore_index=PAD_ID)
            total = action + GENERATION_WEIGHT * generation + RECONSTRUCTION_WEIGHT * reconstruction
        return {"action": action, "generation": generation, "reconstruction": reconstruction, "total": total}


class _GradientLast(torch.autograd.Function):
    """Identity whose backward runs late: autograd runs ready nodes newest first, and this one is older than
    everything made after it in the forward."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad


def make_batch(shape: StepShape, device, seed: int = 1) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *size: torch.randint(0, shape.catalog, size, generator=generator).to(device)  # noqa: E731
    return {"history": draw(shape.users, shape.history), "target": draw(shape.users),
            "negatives": draw(shape.users, shape.negatives)}


class TrainStep:
    """Model + AdamW + one fixed batch; ``step(variant)`` runs forward, backward and the optimizer step."""

    def __init__(self, shape: StepShape, device, seed: int = 0):
        self.device = torch.device(device)
        self.model = KarmaStepModel(shape, seed).to(self.device)
        self.batch = make_batch(shape, self.device, seed + 1)
        # fused AdamW (one kernel over all parameters, no per-parameter temporaries), as training runs use it
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else nullcontext())

    def losses(self, variant: str) -> Dict[str, torch.Tensor]:
        if variant not in VARIANTS:
            raise ValueError(f"bench_train_step: variant must be one of {VARIANTS}, got {variant!r}")
        with self.autocast:
            return self.model.losses(self.batch, fused=variant == "fused")

    def step(self, variant: str) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        total = self.losses(variant)["total"]
        total.backward()
        self.optimizer.step()
        return total.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(shape: StepShape, device, rounds: int = 3, log=None, live: bool = False) -> Dict[str, dict]:
    """Both variants side by side: one warm-up step each, then ``rounds`` rounds alternating (order flips every
    round). Returns {variant: {"time_s": median, "peak_mem_bytes": median, "mem_method": ...}}. ``log``: a
    callable that gets one progress line per measured step. ``live`` (CPU): one more step of each under the
    profiler, whose allocation events give the most bytes live at once ("live_peak_bytes"; no memory the C
    allocator keeps after a free, which the resident set counts)."""
    from bench._mem import live_peak_bytes, peak_memory

    trainer = TrainStep(shape, device)
    for variant in VARIANTS:  # warm-up: AdamW state, Triton JIT / CUDA context, allocator pools
        trainer.step(variant)
    _sync(trainer.device)
    times = {v: [] for v in VARIANTS}
    peaks = {v: [] for v in VARIANTS}
    method = None
    for round_index in range(rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            # The previous step's gradients go before the reading: freed inside the step (its zero_grad), their
            # pages would take this step's new gradients without any growth of the resident set (read low).
            trainer.optimizer.zero_grad(set_to_none=True)

            def timed():
                start = time.perf_counter()
                trainer.step(variant)
                _sync(trainer.device)
                return time.perf_counter() - start

            elapsed, peak, method = peak_memory(timed, trainer.device)
            times[variant].append(elapsed)
            peaks[variant].append(peak)
            if log is not None:
                log(f"{shape.describe()} round {round_index + 1}/{rounds} {variant}: {elapsed:.3f} s, {_mib(peak)}")
    results = {v: {"time_s": statistics.median(times[v]),
                   "peak_mem_bytes": None if None in peaks[v] else int(statistics.median(peaks[v])),
                   "mem_method": method, "rounds": rounds} for v in VARIANTS}
    if live and trainer.device.type == "cpu":
        for variant in VARIANTS:
            trainer.optimizer.zero_grad(set_to_none=True)
            results[variant]["live_peak_bytes"] = live_peak_bytes(lambda: trainer.step(variant))[1]
            if log is not None:
                log(f"{shape.describe()} {variant}: live peak {_mib(results[variant]['live_peak_bytes'])}")
    return results


def _mib(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def markdown_table(results: Dict[StepShape, Dict[str, dict]], device: str) -> str:
    lines = [f"KARMA training step (forward + backward + AdamW), {device}; medians; peak memory = "
             + ("allocator high-water mark above the step's start" if device.startswith("cuda")
                else "resident-set growth during the step")
             + " (the previous step's gradients dropped before it)",
             "",
             "| shape | variant | step time | peak memory | time vs unfused | memory vs unfused |",
             "|---|---|---:|---:|---:|---:|"]
    with_live = any("live_peak_bytes" in row for result in results.values() for row in result.values())
    if with_live:
        lines[-2] += " live peak (profiler) | live vs unfused |"
        lines[-1] += "---:|---:|"
    for shape, result in results.items():
        base = result["unfused"]
        for variant in VARIANTS:
            row = result[variant]
            time_ratio = f"{row['time_s'] / base['time_s']:.2f}x"
            memory_ratio = ("n/a" if not base["peak_mem_bytes"] or row["peak_mem_bytes"] is None
                            else f"{row['peak_mem_bytes'] / base['peak_mem_bytes']:.2f}x")
            line = (f"| {shape.describe()} | {variant} | {row['time_s']:.3f} s | {_mib(row['peak_mem_bytes'])} "
                    f"| {time_ratio} | {memory_ratio} |")
            if with_live:
                live, base_live = row.get("live_peak_bytes"), base.get("live_peak_bytes")
                ratio = "n/a" if not base_live or live is None else f"{live / base_live:.2f}x"
                line += f" {_mib(live)} | {ratio} |"
            lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000], help="LM vocabulary sizes")
    parser.add_argument("--hidden", type=int, default=StepShape.hidden)
    parser.add_argument("--layers", type=int, default=StepShape.layers)
    parser.add_argument("--heads", type=int, default=StepShape.heads)
    parser.add_argument("--users", type=int, default=StepShape.users)
    parser.add_argument("--history", type=int, default=StepShape.history)
    parser.add_argument("--text-len", type=int, default=StepShape.text_len)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant (median)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke shape (overrides the sizes)")
    parser.add_argument("--live", action="store_true",
                        help="CPU: also the allocator-level live peak of one step of each (profiler; slow)")
    args = parser.parse_args(argv)
    for name in ("hidden", "layers", "heads", "users", "history", "text_len", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(v < 4 for v in args.vocab):
        parser.error(f"--vocab sizes must be >= 4, got {args.vocab}")
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be divisible by --heads ({args.heads})")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device must be auto, cpu or cuda (with a CUDA device present), got {args.device!r}")
    base = TINY if args.tiny else StepShape(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                            intermediate=3 * args.hidden, users=args.users, history=args.history,
                                            text_len=args.text_len)
    results = {}
    for vocab in args.vocab:
        shape = replace(base, vocab=vocab)
        results[shape] = compare(shape, device, args.rounds, log=lambda line: print(line, file=sys.stderr, flush=True),
                                 live=args.live)
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    table = markdown_table(results, f"{device}: {where}")
    print(table)
    return table


# --- pytest-benchmark cases ---------------------------------------------------------------------------------
SHAPES = [replace(TINY, vocab=4000)] if QUICK else [StepShape(vocab=32000), StepShape(vocab=128000)]
_TRAINERS: Dict[StepShape, TrainStep] = {}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.describe() for s in SHAPES])
def test_train_step(benchmark, variant, shape):
    pytest.importorskip("transformers", reason="the train-step bench needs transformers (pip install -e '.[hf]')")
    if shape not in _TRAINERS:  # one model per shape (the last one only): both variants train the same weights
        _TRAINERS.clear()
        _TRAINERS[shape] = TrainStep(shape, DEVICE)
    trainer = _TRAINERS[shape]
    dtype = torch.bfloat16 if trainer.device.type == "cuda" else torch.float32
    run_case(benchmark, lambda: trainer.step(variant), op="train_step", impl=variant, shape=shape.describe(),
             dtype=dtype, device=DEVICE, warmup_rounds=1, baseline="unfused",
             lm_tokens=2 * shape.users * shape.text_len)


if __name__ == "__main__":
    main()
