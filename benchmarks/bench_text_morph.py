"""Text morphs on a task whose answer is known: do token swaps reach the target, with how many swaps, and
do they put in the words that carry the answer?

    .venv/bin/python benchmarks/bench_text_morph.py

The task (synthetic, built here): sentences of 6-14 tokens over a vocabulary of 64: [CLS], [SEP], [PAD],
12 positive words, 12 negative words and 37 neutral ones. A sentence has 1-5 sentiment words, never as
many positive as negative ones; its label is 1 (positive) when the positive words outnumber the negative
ones. So the least a morph can do is known: a sentence with p positive and n negative words needs
|p - n| // 2 + 1 swaps to give the target's side a strict majority (a swap of a word of the other side
moves the difference by 2, of a neutral word by 1), and the swaps that do it put in words of the target's
side. (A model may flip at a tie, which the training sentences never have: then it needs fewer swaps than
the rule, and the rule does not agree.)

Two classifiers are trained here from `transformers` configs (random initial weights, nothing downloaded)
for a few seconds each: a tiny BERT (right padding) and a tiny GPT-2 (LEFT padding, the standard for
decoder classifiers; it reads the last token). A third, independent model judges the morphs: a bag-of-
words logistic regression trained on the same sentences (another architecture, another seed, never used
by a morph); the rule itself (count the words) is the ground truth.

Each model morphs 200 held-out sentences it classifies correctly to the other class with
`peering.morph(model, ids, target, layer=<token embeddings>)` (HotFlip swaps verified by a forward pass;
[CLS]/[SEP]/[PAD] excluded and padding frozen; confidence 0.9, at most 10 swaps), and, as a reference, by
an exhaustive greedy search that runs EVERY single swap through the model at each step and keeps the best
(what HotFlip's estimate approximates with 8 verified candidates out of L x V).

Columns: reach (the morphed model gives the target p >= 0.9), median swaps of the reached ones and the
median of the least possible (the rule), the share of put-in words that are of the target's side, the
judge's and the rule's agreement that the morphed sentence is the target (the rule: the target's side has
strictly more words), over all 200, and seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peering

VOCAB, PAD, CLS, SEP = 64, 0, 1, 2
POSITIVE = torch.arange(3, 15)
NEGATIVE = torch.arange(15, 27)
NEUTRAL = torch.arange(27, VOCAB)
SPECIAL = [PAD, CLS, SEP]
MAX_LEN = 16
STEPS, CONFIDENCE, N_MORPHED = 10, 0.9, 200


def sentences(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [n, MAX_LEN] (right-padded), their lengths and labels: [CLS] words [SEP]."""
    ids = torch.full((n, MAX_LEN), PAD, dtype=torch.int64)
    lengths = torch.randint(6, MAX_LEN - 1, (n,), generator=gen)
    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):  # data generation only (not a benchmarked path)
        words = int(lengths[i])
        while True:
            p = int(torch.randint(0, 4, (1,), generator=gen))
            q = int(torch.randint(0, 4, (1,), generator=gen))
            if p != q and 1 <= p + q <= min(5, words):
                break
        chosen = torch.cat([
            POSITIVE[torch.randint(0, 12, (p,), generator=gen)],
            NEGATIVE[torch.randint(0, 12, (q,), generator=gen)],
            NEUTRAL[torch.randint(0, len(NEUTRAL), (words - p - q,), generator=gen)],
        ])
        chosen = chosen[torch.randperm(words, generator=gen)]
        ids[i, 0], ids[i, 1 : words + 1], ids[i, words + 1] = CLS, chosen, SEP
        labels[i] = int(p > q)
    return ids, lengths + 2, labels


def left_padded(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(ids, PAD)
    for i, n in enumerate(lengths.tolist()):
        out[i, MAX_LEN - n :] = ids[i, :n]
    return out


def counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.isin(ids, POSITIVE).sum(1), torch.isin(ids, NEGATIVE).sum(1)


class Logits(nn.Module):
    """A `transformers` classifier as ids, attention_mask -> logits [B, 2]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids, attention_mask=attention_mask).logits


class BagOfWords(nn.Module):
    """The judge: logistic regression on word counts (padding and specials count for nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(VOCAB, 2)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bag = F.one_hot(ids, VOCAB).float().mul(attention_mask[..., None]).sum(1)
        return self.linear(bag)


def build(kind: str, seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=MAX_LEN, num_labels=2, pad_token_id=PAD,
        )
        return Logits(transformers.BertForSequenceClassification(config))
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=MAX_LEN, num_labels=2,
            pad_token_id=PAD, bos_token_id=CLS, eos_token_id=SEP,
        )
        return Logits(transformers.GPT2ForSequenceClassification(config))
    return BagOfWords()


def train(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Adam on batches of 64; returns the seconds it took."""
    start = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(ids), (64,), generator=gen)
        loss = F.cross_entropy(model(ids[rows], mask[rows]), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - start


def accuracy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids, mask).argmax(1) == labels).float().mean())


def exhaustive(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> Any:
    """The reference: at each step run every single swap (every real non-special position, every allowed
    token) through the model and keep the best, until p(target) >= CONFIDENCE or STEPS swaps."""
    allowed = torch.tensor([v for v in range(VOCAB) if v not in SPECIAL])
    x = ids.clone()
    swaps = torch.zeros(len(x), dtype=torch.int64)
    with torch.no_grad():
        for _ in range(STEPS):
            p = model(x, mask).softmax(1).gather(1, target[:, None])[:, 0]
            moving = (p < CONFIDENCE).nonzero().flatten()
            if len(moving) == 0:
                break
            for i in moving.tolist():  # one batch of every swap per sample
                positions = ((mask[i] == 1) & ~torch.isin(x[i], torch.tensor(SPECIAL))).nonzero().flatten()
                cand = x[i].repeat(len(positions) * len(allowed), 1)
                pos = positions.repeat_interleave(len(allowed))
                cand[torch.arange(len(cand)), pos] = allowed.repeat(len(positions))
                q = model(cand, mask[i].expand_as(cand)).log_softmax(1)[:, target[i]]
                best = int(q.argmax())
                if float(q[best]) > float(p[i].log()):
                    x[i] = cand[best]
                    swaps[i] += 1
        reached = model(x, mask).softmax(1).gather(1, target[:, None])[:, 0] >= CONFIDENCE
    return x, reached, swaps


def row(name: str, ids: torch.Tensor, final: torch.Tensor, reached: torch.Tensor, swaps: torch.Tensor,
        target: torch.Tensor, judge: nn.Module, mask: torch.Tensor, seconds: float) -> str:
    pos, neg = counts(ids)
    least = ((pos - neg).abs() // 2 + 1).float()
    changed = final != ids
    side = torch.where(target[:, None] == 1, torch.isin(final, POSITIVE), torch.isin(final, NEGATIVE))
    right_words = float((side & changed).sum()) / max(1, int(changed.sum()))
    fpos, fneg = counts(final)
    rule = torch.where(target == 1, fpos > fneg, fneg > fpos).float().mean()  # a tie decides nothing
    with torch.no_grad():
        judged = (judge(final, mask).argmax(1) == target).float().mean()
    done = reached.nonzero().flatten()
    med = statistics.median(swaps[done].tolist()) if len(done) else float("nan")
    least_med = statistics.median(least[done].tolist()) if len(done) else float("nan")
    return (f"| {name} | {float(reached.float().mean()):.1%} | {med:g} (least {least_med:g}) | "
            f"{right_words:.1%} | {float(judged):.1%} | {float(rule):.1%} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    train_ids, train_len, train_y = sentences(6000, gen)
    test_ids, test_len, test_y = sentences(1000, gen)
    judge = build("bow", 7)
    mask_of = lambda ids: (ids != PAD).long()  # noqa: E731
    secs = train(judge, train_ids, mask_of(train_ids), train_y, 600)
    print(f"judge (bag-of-words logistic regression): held-out accuracy "
          f"{accuracy(judge, test_ids, mask_of(test_ids), test_y):.3f} ({secs:.1f} s)")
    print("\n| model, method | reach p >= 0.9 | swaps (median) | put-in words of the target's side | "
          "judge agrees | rule agrees | seconds |\n|---|---|---|---|---|---|---|")
    lines = []
    for kind in ("bert", "gpt2"):
        model = build(kind, 0)
        tr, te = train_ids, test_ids
        if kind == "gpt2":
            tr, te = left_padded(train_ids, train_len), left_padded(test_ids, test_len)
        secs = train(model, tr, mask_of(tr), train_y, 400)
        acc = accuracy(model, te, mask_of(te), test_y)
        lines.append(f"{kind}: held-out accuracy {acc:.3f} after {secs:.1f} s of training")
        with torch.no_grad():
            right = (model(te, mask_of(te)).argmax(1) == test_y).nonzero().flatten()[:N_MORPHED]
        ids, mask, target = te[right], mask_of(te[right]), 1 - test_y[right]
        embed = model.net.get_input_embeddings()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unreached are counted in the table
            res = peering.morph(model, ids, target, layer=embed, forward_kwargs={"attention_mask": mask},
                                exclude_ids=SPECIAL, confidence=CONFIDENCE, steps=STEPS)
        secs = time.perf_counter() - start
        steps = torch.where(res.steps >= 0, res.steps, res.distance.long())
        print(row(f"{kind}, peering HotFlip", ids, res.inputs, res.success, steps, target, judge, mask, secs))
        start = time.perf_counter()
        final, reached, swaps = exhaustive(model, ids, mask, target)
        secs = time.perf_counter() - start
        print(row(f"{kind}, exhaustive greedy", ids, final, reached, swaps, target, judge, mask, secs))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
