"""Build model/tiny: a tokenizer and a tiny GraniteMoeHybrid model that memorizes model/corpus as FIM.

The real Granite-4.0-H checkpoints are far too big for unit tests on a laptop, so the tests use a
model of the same family (Mamba2 + attention layers, no positional embedding, the same multipliers)
that has been trained until greedy decoding reproduces every fill-in-the-middle example of a small
corpus exactly. Tests can then assert exact completions instead of "something came out".

The FIM documents are small windows of the corpus files (the middle plus WINDOW lines on each side):
locating a gap anywhere in a whole file takes a model far larger than a test fixture should be, while
a window is memorized in a few minutes on a CPU and exercises exactly the same prompt layout.

Usage:  python model/make_tiny.py [--corpus model/corpus] [--out model/tiny]

Everything is deterministic for a given machine: fixed seeds, deterministic torch algorithms and a
fixed number of CPU threads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from granite_lsp.tokens import END_OF_TEXT, FILENAME, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, REPONAME

# The GPT-4 (cl100k) split pattern, which Granite's tokenizer also uses before byte-level BPE.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Like the real Granite tokenizer, only <|end_of_text|> is "special"; the FIM and metadata tokens are
# plain added tokens (matched in text, never split, but not skipped when decoding).
NON_SPECIAL_TOKENS = [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, FILENAME, REPONAME]
STOP_TOKENS = [END_OF_TEXT, *NON_SPECIAL_TOKENS]

WINDOW = 2  # lines of context on each side of a middle in a fixture document
MIN_MARGIN = 1.0  # a target token must win by this many logits to count as memorized


# --------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE shaped like Granite's (cl100k split + ByteLevel, no normalizer)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_TOKENS])
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """Write tokenizer.json plus the transformers side files (no BOS is prepended, as in Granite)."""
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(
        out / "special_tokens_map.json",
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
    )


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One FIM training sequence: the model sees ids[:target_start] and must emit the rest."""

    file: str
    a: int  # middle start (a line start) in the file text
    b: int  # middle end (a line end)
    k: int  # characters of the middle already typed (placed after <|fim_middle|>)
    ids: tuple[int, ...]
    target_start: int


def line_bounds(text: str) -> list[tuple[int, int]]:
    """(start, end) of every line, end excluding the newline; no phantom line after a final newline."""
    bounds, start = [], 0
    for line in text.split("\n"):
        bounds.append((start, start + len(line)))
        start += len(line) + 1
    if text.endswith("\n"):
        bounds.pop()
    return bounds


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cursor_cuts(middle: str) -> list[int]:
    """Cursor offsets in the middle's first line that must complete without token healing.

    Line start, after the indentation and every pre-token boundary (e.g. after "return"). Cursors
    inside a token of the middle, including after a space that begins the next word, are left to
    the server's token healing.
    """
    first = middle.split("\n", 1)[0]
    cuts = {0, indent_of(first), len(first)}
    splitter = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    cuts.update(end for _, (_, end) in splitter.pre_tokenize_str(first))
    return sorted(cuts)


def fim_prompt(tokenizer: Tokenizer, prefix: str, suffix: str, typed: str) -> list[int]:
    """The server's prompt layout; each piece is encoded on its own, special ids looked up by name."""
    tid = tokenizer.token_to_id
    return (
        [tid(FIM_PREFIX)]
        + encode(tokenizer, prefix)
        + [tid(FIM_SUFFIX)]
        + encode(tokenizer, suffix)
        + [tid(FIM_MIDDLE)]
        + encode(tokenizer, typed)
    )


@dataclass(frozen=True)
class FimDocument:
    """A fixture document: a window of a corpus file, the middle it hides, the fixture cursor."""

    file: str
    text: str  # the window, middle included
    a: int  # middle start (a line start)
    b: int  # middle end (a line end)
    before: str  # text of the middle's first line before the fixture cursor


def fim_documents(corpus: dict[str, str]) -> list[FimDocument]:
    docs = []
    for name, first_line, n_lines, before in FIXTURE_SPECS:
        text = corpus[name]
        bounds = line_bounds(text)
        index = next(i for i, (s, e) in enumerate(bounds) if text[s:e] == first_line)
        lo = bounds[max(0, index - WINDOW)][0]
        last = min(len(bounds) - 1, index + n_lines - 1 + WINDOW)
        hi = min(len(text), bounds[last][1] + 1)  # keep the window's final newline
        a, b = bounds[index][0] - lo, bounds[index + n_lines - 1][1] - lo
        assert first_line.startswith(before), before
        docs.append(FimDocument(name, text[lo:hi], a, b, before))
    return docs


def build_examples(tokenizer: Tokenizer, docs: list[FimDocument]) -> list[Example]:
    """Each document's middle from its line start, plus each cursor cut whose tokens differ.

    A cut whose typed text encodes to a prefix of the middle's own tokens is already covered by the
    line-start example (teacher forcing walks through exactly those tokens), so it is skipped.
    """
    eot = tokenizer.token_to_id(END_OF_TEXT)
    examples = []
    for doc in docs:
        text, a, b = doc.text, doc.a, doc.b
        middle = text[a:b]
        full = encode(tokenizer, middle)
        for k in sorted(set(cursor_cuts(middle)) | {len(doc.before)}):
            typed = encode(tokenizer, middle[:k])
            if k > 0 and typed == full[: len(typed)]:
                continue
            prompt = fim_prompt(tokenizer, text[:a], text[b:], middle[:k])
            ids = prompt + encode(tokenizer, middle[k:]) + [eot]
            examples.append(Example(doc.file, a, b, k, tuple(ids), len(prompt)))
    return examples


# ------------------------------------------------------------------------------------------------- model


def tiny_config(tokenizer: Tokenizer, hidden: int, layer_types: list[str]) -> dict:
    """A miniature of granite-4.0-h-350m: same layer kinds, NoPE attention, dense MLP, multipliers."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    mamba_d_head = 32
    return {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": "granitemoehybrid",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_multiplier": 0.015625,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "embedding_multiplier": 12,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden,
        "layer_types": layer_types,
        "logits_scaling": 3,
        "mamba_chunk_size": 32,
        "mamba_conv_bias": True,
        "mamba_d_conv": 4,
        "mamba_d_head": mamba_d_head,
        "mamba_d_state": 32,
        "mamba_expand": 2,
        "mamba_n_groups": 1,
        "mamba_n_heads": 2 * hidden // mamba_d_head,
        "mamba_proj_bias": False,
        "max_position_embeddings": 32768,
        "num_attention_heads": hidden // 32,
        "num_experts_per_tok": 0,
        "num_hidden_layers": len(layer_types),
        "num_key_value_heads": hidden // 64,
        "num_local_experts": 0,
        "output_router_logits": False,
        "position_embedding_type": "nope",
        "residual_multiplier": 0.246,
        "rms_norm_eps": 1e-05,
        "router_aux_loss_coef": 0.01,
        "shared_intermediate_size": 2 * hidden,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "use_cache": True,
        "vocab_size": tokenizer.get_vocab_size(),
    }


def batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffled batches of examples from the same file, so right-padding wastes little compute."""
    by_file: dict[str, list[Example]] = {}
    for ex in examples:
        by_file.setdefault(ex.file, []).append(ex)
    out = []
    for name in sorted(by_file):
        group = by_file[name][:]
        rng.shuffle(group)
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(out)
    return out


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (the model is causal, so padding after a sequence never changes its logits).

    Returns input ids and next-token labels with -100 everywhere except the middle and final EOT.
    """
    width = max(len(ex.ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, ex in enumerate(batch):
        seq = torch.tensor(ex.ids)
        ids[row, : len(seq)] = seq
        # logits at position t predict token t + 1
        labels[row, ex.target_start - 1 : len(seq) - 1] = seq[ex.target_start :]
    return ids, labels


def memorized_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: does every labelled position's target win the argmax by at least MIN_MARGIN?

    When it does, greedy decoding provably walks exactly through the target tokens (and the margin
    absorbs the tiny numeric differences between batched, cached and uncached forwards).
    """
    mask = labels != -100
    safe = labels.clamp(min=0)
    target = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, safe.unsqueeze(-1), float("-inf")).amax(-1)
    ok = (target - others >= MIN_MARGIN) | ~mask
    return ok.all(dim=-1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_fim(
    model: GraniteMoeHybridForCausalLM,
    optimizer: torch.optim.Optimizer,
    examples: list[Example],
    pad_id: int,
    args: argparse.Namespace,
) -> None:
    """AdamW on the middle tokens until a whole epoch is memorized (or the step budget runs out).

    The learning rate decays (cosine) over --fim-steps and then stays at its floor. Once few examples
    are left, those not yet memorized when last seen are repeated in the next epoch, which gets the
    long tail done much sooner than plain epochs.
    """
    rng = random.Random(args.seed)
    step, start, hard, epoch = 0, time.time(), [], 0
    while step < 2 * args.fim_steps:
        epoch += 1
        failed, loss_sum, n_batches = [], 0.0, 0
        for batch in batches(examples + hard, args.batch_size, rng):
            progress = min(1.0, step / args.fim_steps)
            set_lr(optimizer, args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress))))
            ids, labels = collate(batch, pad_id)
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ok = memorized_rows(logits.detach(), labels)
            failed += [ex for ex, good in zip(batch, ok.tolist(), strict=True) if not good]
            loss_sum += loss.item()
            n_batches += 1
            step += 1
        failed = sorted(set(failed), key=lambda ex: (ex.file, ex.a, ex.b, ex.k))
        print(
            f"fim epoch {epoch:3d}  step {step:5d}  loss {loss_sum / n_batches:.4f}  "
            f"memorized {1 - len(failed) / len(examples):6.1%}  {time.time() - start:5.0f}s",
            flush=True,
        )
        if not failed and not hard:
            return
        hard = failed if len(failed) < len(examples) // 4 else []


@torch.no_grad()
def memorization_rate(model: GraniteMoeHybridForCausalLM, examples: list[Example], pad_id: int) -> float:
    """Fraction of examples memorized, checked one unpadded sequence at a time."""
    hits = 0
    for ex in examples:
        ids, labels = collate([ex], pad_id)
        hits += int(memorized_rows(model(input_ids=ids).logits, labels)[0])
    return hits / len(examples)


@torch.no_grad()
def greedy(model: GraniteMoeHybridForCausalLM, ids: list[int], stop: set[int], limit: int = 96) -> list[int]:
    """Plain greedy decoding by re-running the whole sequence each step (no cache involved)."""
    out: list[int] = []
    while len(out) < limit:
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return out


@torch.no_grad()
def healed_greedy(
    model: GraniteMoeHybridForCausalLM, tokenizer: Tokenizer, prompt: list[int], typed: str, stop: set[int]
) -> str:
    """Reference token healing: drop the last typed token, then force the first generated tokens to
    agree with its text. Only used to check that mid-token fixtures are reachable this way."""
    typed_ids = encode(tokenizer, typed)
    if not typed_ids:
        return tokenizer.decode(greedy(model, prompt, stop))
    head = prompt + typed_ids[:-1]
    pending = tokenizer.decode(typed_ids[-1:])
    texts = [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]
    out: list[int] = []
    while pending:
        logits = model(input_ids=torch.tensor([head + out])).logits[0, -1]
        allowed = [i for i, t in enumerate(texts) if t and (t.startswith(pending) or pending.startswith(t))]
        best = max(allowed, key=lambda i: float(logits[i]))
        out.append(best)
        pending = pending[len(texts[best]) :] if pending.startswith(texts[best]) else ""
    text = tokenizer.decode(out) + tokenizer.decode(greedy(model, head + out, stop))
    return text[len(tokenizer.decode(typed_ids[-1:])) :]


# ---------------------------------------------------------------------------------------------- fixtures

# (file, exact first line of the middle, number of lines in the middle, text before the cursor on it)
FIXTURE_SPECS = [
    ("tasks.py", "    def finish(self) -> None:", 3, ""),
    ("tasks.py", '        return STATUS_LABELS.get(self.status, "不明")', 1, "        "),
    ("tasks.py", '        self.status = "done"', 2, '        self.status = "done"'),
    (
        "tasks.py",
        'STATUS_LABELS = {"done": "完了 🎉", "todo": "未着手", "wip": "作業中"}',
        1,
        'STATUS_LABELS = {"done": "完了 🎉", ',
    ),
    ("tasks.py", '        print(f"🎉 {self.title} を完了しました")', 1, '        print(f"🎉 {self.title}'),
    ("tasks.py", "    return counts", 1, "    ret"),
    ("lru.ts", "      this.entries.delete(key);", 2, "      this.entries"),
    ("lru.ts", "    return value;", 1, "    "),
    ("queue.lua", "  self.last = self.last + 1", 2, ""),
    ("queue.lua", "  local value = self.items[self.first]", 4, "  local value = "),
    ("wordcount.go", "\tfor scanner.Scan() {", 5, "\t"),
    ("wordcount.go", "\t\treturn counts[words[i]] > counts[words[j]]", 1, "\t\treturn"),
    ("stack.rs", "        if self.items.len() >= self.limit {", 5, "        "),
    ("stack.rs", "        self.items.is_empty()", 1, "        self.items.is_"),
]


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def make_fixtures(model: GraniteMoeHybridForCausalLM, tokenizer: Tokenizer, docs: list[FimDocument]) -> list[dict]:
    """Turn the documents into LSP-shaped fixtures, keeping only those the model really completes.

    `mid_token` marks cursors whose typed text does not tokenize to a prefix of the middle's own
    tokens; those are kept when reference token healing completes them (the server heals).
    """
    stop = {tokenizer.token_to_id(t) for t in STOP_TOKENS}
    fixtures = []
    for doc in docs:
        text, a, b = doc.text, doc.a, doc.b
        c = a + len(doc.before)
        middle, rest = text[a:b], text[c:b]
        prompt = fim_prompt(tokenizer, text[:a], text[b:], "")
        typed = encode(tokenizer, text[a:c])
        mid_token = typed != encode(tokenizer, middle)[: len(typed)]
        plain = tokenizer.decode(greedy(model, prompt + typed, stop)) == rest
        healed = healed_greedy(model, tokenizer, prompt, text[a:c], stop) == rest
        label = f"{doc.file}:{text[:a].count(chr(10)) + 1} col {len(doc.before)}"
        if not (plain or (mid_token and healed)):
            print(f"  dropped fixture {label}: not reproduced")
            continue
        document = text[:c] + text[b:]
        fixtures.append(
            {
                "file": f"corpus/{doc.file}",
                "text": document,
                "line": document[:c].count("\n"),
                "character": utf16_len(text[a:c]),
                "middle": rest,
                "anchor_line_start": c > a,
                "mid_token": mid_token,
                "plain_greedy": plain,
                "healed_greedy": healed,
            }
        )
        print(f"  fixture {label} mid_token={mid_token} plain={plain} healed={healed}")
    return fixtures


# ------------------------------------------------------------------------------------------------ driver


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    root = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=root / "corpus")
    parser.add_argument("--out", type=Path, default=root / "tiny")
    parser.add_argument("--vocab-size", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", default="mamba,mamba,attention,mamba,mamba,attention")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fim-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)

    corpus = {p.name: p.read_text(encoding="utf-8") for p in sorted(args.corpus.iterdir()) if p.is_file()}
    tokenizer = train_tokenizer(list(corpus.values()), args.vocab_size)
    save_tokenizer(tokenizer, args.out)
    for text in corpus.values():
        assert tokenizer.decode(encode(tokenizer, text), skip_special_tokens=False) == text

    docs = fim_documents(corpus)
    examples = build_examples(tokenizer, docs)
    n_tokens = sum(len(ex.ids) for ex in examples)
    print(
        f"{len(docs)} documents, vocab {tokenizer.get_vocab_size()}, {len(examples)} examples, "
        f"{n_tokens} tokens per epoch"
    )

    config = GraniteMoeHybridConfig(**tiny_config(tokenizer, args.hidden, args.layers.split(",")))
    model = GraniteMoeHybridForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    started = time.time()
    model.train()
    eot = tokenizer.token_to_id(END_OF_TEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    train_fim(model, optimizer, examples, eot, args)
    model.eval()
    print(f"training took {time.time() - started:.0f}s")

    rate = memorization_rate(model, examples, eot)
    print(f"memorization rate: {rate:.2%} of {len(examples)} examples")

    model.save_pretrained(args.out)
    # Write the config by hand so it reads like the real checkpoints ("mamba"/"attention" layer names).
    write_json(args.out / "config.json", tiny_config(tokenizer, args.hidden, args.layers.split(",")))
    fixtures = make_fixtures(model, tokenizer, docs)
    write_json(args.out / "fixtures.json", fixtures)
    print(f"{len(fixtures)} fixtures written; done in {time.time() - started:.0f}s")
    if rate < 1.0:
        raise SystemExit("the model did not memorize every example")


if __name__ == "__main__":
    main()
