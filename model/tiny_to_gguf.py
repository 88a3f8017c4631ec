"""Convert model/tiny to GGUF for llama.cpp's server, with a llama.cpp tree's own convert_hf_to_gguf.py.

    python model/tiny_to_gguf.py LLAMA_CPP_TREE OUT.gguf

Two things the converter gets wrong for this tiny model, fixed here around it (the tree is not edited):
- it identifies the BPE pre-tokenizer by hashing the tokens of a test string, and refuses a tokenizer it
  has no hash for; model/tiny's tokenizer was trained by us on the pre-tokenizer of Llama 3 (the same
  split regex as Granite's), so it is reported as ``llama-bpe``;
- it pads a Granite hybrid's vocabulary to a multiple of 8 (right for the real 100k one, wrong for the
  tiny model's 775 tokens: the embedding has exactly 775 rows), so no padding.
Used by the llama.cpp server test (tests/test_remote.py) and the remote bench; see README.
"""

from __future__ import annotations

import sys
from pathlib import Path

TINY = Path(__file__).resolve().parent / "tiny"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    tree, out = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    if not (tree / "convert_hf_to_gguf.py").is_file():
        print(f"{tree} has no convert_hf_to_gguf.py (want a llama.cpp source tree)", file=sys.stderr)
        return 2
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]  # the tree's own gguf package, as its converter does
    import convert_hf_to_gguf
    from conversion import base, granite, mamba

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"

    def set_vocab(self) -> None:
        self.hparams["pad_vocab_size_multiple"] = 1
        mamba.Mamba2Model.set_vocab(self)

    granite.GraniteHybridModel.set_vocab = set_vocab
    sys.argv = ["convert_hf_to_gguf.py", str(TINY), "--outfile", str(out), "--outtype", "f32"]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
