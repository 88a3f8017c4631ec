"""Speculative decoding on the tiny model's fixtures: tokens per forward and decode time, against plain.

    .venv/bin/python bench/spec_fixtures.py [--rounds 7]

Every fixture of model/tiny (tests/conftest.py's), decoded to its end (up to 96 tokens) in three ways,
in alternating rounds: ``plain`` (speculate off), ``auto`` (the default: VerifyCost feeds drafts only
where its measurements say they pay) and ``always`` (drafts fed whatever they cost: what prompt lookup
gets accepted, and what verifying it costs on this model). Decode time is summed over the fixtures per
round; the figures are medians over rounds, as ratios to ``plain`` of the same run. The tokens are
checked to be the same in every way.

The fixtures' middles are new text (not in their prompts), so prompt lookup finds little there.
``--context`` puts each fixture's whole file (middle included) in front of its prompt as another open
file's text: what completing code copied from another file looks like, where drafts get accepted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from granite_lsp.documents import Document  # noqa: E402
from granite_lsp.service import CompletionService, load  # noqa: E402
from granite_lsp.settings import Settings  # noqa: E402
from granite_lsp.speculate import MAX_DRAFT, VerifyCost  # noqa: E402

TINY = ROOT / "model" / "tiny"


class AlwaysDraft(VerifyCost):
    def limit(self) -> int:
        return MAX_DRAFT


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", action="store_true", help="each fixture's whole file as another file's context")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixtures = json.loads((TINY / "fixtures.json").read_text())
    loaded = load(Settings().updated({"model": str(TINY), "device": "cpu", "dtype": "float32"}))

    def service(**options: object) -> CompletionService:
        return CompletionService(loaded, Settings().updated({"model": str(TINY), "typeThrough": False, **options}))

    ways = {"plain": service(speculate=False), "auto": service(), "always": service()}
    ways["always"].engine.costs = AlwaysDraft()
    ms: dict[str, list[float]] = {w: [] for w in ways}
    counts: dict[str, list[int]] = {w: [0, 0, 0, 0] for w in ways}  # tokens after the first, forwards, drafts, accepted
    for r in range(args.rounds + 1):  # round 0 warms up
        order = list(ways) if r % 2 else list(reversed(ways))
        tokens: dict[str, list[list[int]]] = {}
        for way in order:
            svc, total, out = ways[way], 0.0, []
            for i, fx in enumerate(fixtures):
                cursor = Document("x", fx["text"]).offset_at(fx["line"], fx["character"])
                full = fx["text"][:cursor] + fx["middle"] + fx["text"][cursor:]
                context = loaded.tokenizer.encode(full) if args.context else None
                g = svc.complete(
                    f"file:///{i}.py", fx["text"], cursor, max_tokens=96, shape=False, context_ids=context
                ).generation
                total += g.stats.decode_ms
                out.append(g.token_ids)
                if r == 1:
                    c = counts[way]
                    c[0] += len(g.token_ids) - (g.stop_reason != "eos")
                    c[1] += g.stats.decode_forwards
                    c[2] += g.stats.draft_tokens
                    c[3] += g.stats.accepted_tokens
            if r:
                ms[way].append(total)
            tokens[way] = out
        for way, out in tokens.items():
            assert out == tokens["plain"], f"{way}: tokens differ from plain"
    base = statistics.median(ms["plain"])
    where = ", each fixture's file as context" if args.context else ""
    print(f"model/tiny, {len(fixtures)} fixtures{where}, {args.rounds} rounds, threads {args.threads}, medians")
    for way in ways:
        n, forwards, drafted, accepted = counts[way]
        med = statistics.median(ms[way])
        print(
            f"{way:>7}: decode {med:7.1f} ms ({med / base:.2f}x plain), {n / max(1, forwards):.2f} tokens per forward,"
            f" {drafted} drafts fed, {accepted} accepted"
        )


if __name__ == "__main__":
    main()
