"""Datasets whose samples depend only on (seed, step, position in the global batch).

The samples of step t are positions [t*B, (t+1)*B) of an endless stream made
of seeded permutations of the dataset (one permutation per epoch). A dp rank
takes its contiguous sub-slice of the global batch (``ParallelLayout``), so the
union of what the ranks see never depends on the world size.

Two sources:
* synthetic: each sample walks a seeded global successor rule (next token =
  perm[token], with a seeded 10% chance of a random token instead), so even a
  tiny model learns it within a few dozen steps and the loss clearly moves;
* tokens: a memory-mapped flat token file (uint16/uint32), cut into
  non-overlapping windows of seq_len+1 tokens.

``python -m trainer.data build TEXT OUT [--dtype uint16]`` makes a token file
from text with a byte-level tokenizer (token = UTF-8 byte, vocabulary 256), the
zero-dependency default. ``python -m trainer.data prepare`` (also ``tenax data
prepare``) streams plain-text or JSONL files through a Hugging Face
``tokenizer.json`` (the ``tokenizers`` package) into one token file, a separator
token after every document, mixing several files by weight (``prepare``).
"""

from __future__ import annotations

import argparse
import array
import json
import mmap
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from trainer import rng

_TORCH_DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}
NOISE_PROBABILITY = 0.1


class SyntheticTokens:
    """``num_samples`` samples of seq_len+1 tokens, each a function of (seed, index)."""

    def __init__(self, *, num_samples: int, seq_len: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(rng.key(rng.DATA_SAMPLE, self.seed, index))
        length = self.seq_len + 1
        noise = torch.rand(length, generator=gen) < NOISE_PROBABILITY
        random_tokens = torch.randint(0, self.vocab_size, (length,), generator=gen)
        # The walk is sequential (each token depends on the one before), so it runs on
        # Python ints: indexing tensors element by element costs ~100x more (it was most
        # of a GPU step's time), and the tokens are bit-identical either way.
        successor, is_noise, randoms = self._successor_list(), noise.tolist(), random_tokens.tolist()
        walk = [randoms[0]]
        for i in range(1, length):
            walk.append(randoms[i] if is_noise[i] else successor[walk[-1]])
        return torch.tensor(walk, dtype=torch.int64)

    def _successor_list(self) -> list[int]:
        if getattr(self, "_perm_list", None) is None:
            self._perm_list = self._successor().tolist()
        return self._perm_list

    def _successor(self) -> torch.Tensor:
        """The dataset's rule: one seeded permutation of the vocabulary (cached)."""
        if getattr(self, "_perm", None) is None:
            gen = torch.Generator().manual_seed(rng.key(rng.DATA_SAMPLE, self.seed, -1))
            self._perm = torch.randperm(self.vocab_size, generator=gen)
        return self._perm


class TokenFile:
    """Non-overlapping windows of seq_len+1 tokens of a flat uint16/uint32 file (memory-mapped)."""

    def __init__(self, path: str | os.PathLike, *, dtype: str, seq_len: int, vocab_size: int):
        self.path, self.seq_len = Path(path), seq_len
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"data.dtype: unknown token dtype {dtype!r}")
        itemsize = 2 if dtype == "uint16" else 4
        size = self.path.stat().st_size
        if size % itemsize:
            raise ValueError(f"data.path: {path} is {size} bytes, not a whole number of {dtype} tokens")
        n_tokens = size // itemsize
        self.num_samples = (n_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(f"data.path: {path} holds {n_tokens} tokens, fewer than one sample of {seq_len + 1}")
        with open(self.path, "rb") as f:
            # Copy-on-write private map: pages are read lazily, and torch gets a
            # writable buffer without any chance of touching the file.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._tokens = torch.frombuffer(self._map, dtype=_TORCH_DTYPES[dtype])
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        window = self._tokens[start : start + self.seq_len + 1].to(torch.int64)
        if int(window.max()) >= self.vocab_size:
            # never the token's value: the message reaches every viewer through `tenax logs`
            raise ValueError(f"data.path: {self.path} holds a token >= model.vocab_size={self.vocab_size} "
                             f"(the file was not made for this vocabulary)")
        return window


class StepSampler:
    """Which dataset samples step t uses, at which global-batch positions."""

    def __init__(self, dataset, *, global_batch_size: int, seed: int):
        self.dataset, self.batch, self.seed = dataset, global_batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(rng.key(rng.DATA_ORDER, self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=gen), epoch
        return self._perm

    def sample_index(self, step: int, position: int) -> int:
        """Dataset index at ``position`` in [0, B) of the global batch of ``step``."""
        stream = step * self.batch + position
        epoch, offset = divmod(stream, len(self.dataset))
        return int(self._permutation(epoch)[offset])

    def batch_tokens(self, step: int, positions: range) -> torch.Tensor:
        """[len(positions), seq_len+1] int64 tokens of those global-batch positions."""
        return torch.stack([self.dataset.sample(self.sample_index(step, p)) for p in positions])


def build_dataset(spec):
    """The dataset a JobSpec names (``data.kind``)."""
    m, d = spec.model, spec.data
    if d.kind == "synthetic":
        return SyntheticTokens(num_samples=d.num_samples, seq_len=m.seq_len, vocab_size=m.vocab_size, seed=spec.seed)
    return TokenFile(d.path, dtype=d.dtype, seq_len=m.seq_len, vocab_size=m.vocab_size)


# ------------------------------------------------------------------ tokenizer
def encode_bytes(text: str) -> list[int]:
    """Byte-level tokenizer: one token per UTF-8 byte (vocabulary 256)."""
    return list(text.encode("utf-8"))


def decode_bytes(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def write_token_file(tokens: list[int], out: str | os.PathLike, *, dtype: str = "uint16") -> int:
    """Write tokens as a flat little-endian array; returns the token count."""
    arr = array.array("H" if dtype == "uint16" else "I", tokens)
    if arr.itemsize != (2 if dtype == "uint16" else 4):
        raise RuntimeError(f"no {dtype} array type on this platform")
    if sys.byteorder != "little":
        arr.byteswap()
    Path(out).write_bytes(arr.tobytes())
    return len(arr)


# ------------------------------------------------------------ prepare (tokenizers)
def read_documents(path: str | os.PathLike, *, field: str = "text") -> Iterator[str]:
    """Documents of a file, streamed: one per JSONL line (its ``field``) for ``*.jsonl``,
    else blocks of plain text separated by blank lines."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        if path.suffix in (".jsonl", ".ndjson"):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ValueError(f"{path}:{number}: no string field {field!r}")
                yield record[field]
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
        if block:
            yield "".join(block)


def weighted_documents(sources: list[tuple[str, float]], *, seed: int, field: str = "text") -> Iterator[tuple[int, str]]:
    """(source index, document) of several files mixed by weight, deterministically.

    A file of weight w contributes each document floor(w) times, plus once more when a
    hash keyed by (seed, file, pass, document) falls below frac(w) (so 0.5 keeps about half).
    Documents are interleaved by tokens: the next one comes from the source furthest
    behind its share (emitted characters / weight), so the mix holds along the file.
    """
    def passes(index: int, path: str, weight: float) -> Iterator[str]:
        whole, frac = int(weight), weight - int(weight)
        for n in range(whole + (1 if frac > 0 else 0)):
            for d, doc in enumerate(read_documents(path, field=field)):
                if n < whole or (rng.key(rng.DATA_ORDER, seed, index, n, d) >> 11) / float(1 << 52) < frac:
                    yield doc

    streams = {i: passes(i, path, w) for i, (path, w) in enumerate(sources) if w > 0}
    emitted = {i: 0 for i in streams}
    while streams:
        i = min(streams, key=lambda k: (emitted[k] / sources[k][1], k))
        doc = next(streams[i], None)
        if doc is None:
            del streams[i]
            continue
        emitted[i] += len(doc) + 1
        yield i, doc


def prepare(sources: list[tuple[str, float]], out: str | os.PathLike, *, tokenizer: str, separator: str = "",
            dtype: str = "", field: str = "text", seed: int = 0) -> dict:
    """Tokenize documents into a flat token file, ``separator`` (a token of the tokenizer;
    default its EOS-like special token) after each. Streams: memory holds one document.
    Writes ``OUT.json`` next to it ({vocab_size, dtype, tokens, documents, separator_id})."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if not separator:
        special = [t for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]") if tok.token_to_id(t) is not None]
        if not special:
            raise ValueError(f"{tokenizer}: no end-of-document token found; pass --separator TOKEN")
        separator = special[0]
    sep_id = tok.token_to_id(separator)
    if sep_id is None:
        raise ValueError(f"--separator: {separator!r} is not a token of {tokenizer}")
    dtype = dtype or ("uint16" if vocab <= 1 << 16 else "uint32")
    if dtype == "uint16" and vocab > 1 << 16:
        raise ValueError(f"--dtype uint16 cannot hold the {vocab} tokens of {tokenizer}: use uint32")
    code = "H" if dtype == "uint16" else "I"
    tokens = documents = 0
    per_source = [0] * len(sources)
    tmp = Path(str(out) + ".tmp")
    with open(tmp, "wb") as f:
        for index, doc in weighted_documents(sources, seed=seed, field=field):
            ids = array.array(code, tok.encode(doc, add_special_tokens=False).ids)
            ids.append(sep_id)
            if sys.byteorder != "little":
                ids.byteswap()
            f.write(ids.tobytes())
            tokens += len(ids)
            per_source[index] += len(ids)
            documents += 1
    os.replace(tmp, out)
    info = {"vocab_size": vocab, "dtype": dtype, "tokens": tokens, "documents": documents, "separator_id": sep_id,
            "tokens_per_source": {path: n for (path, _), n in zip(sources, per_source)}}
    Path(str(out) + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _source(text: str) -> tuple[str, float]:
    path, weight = text, "1"
    if ":" in text and not os.path.exists(text):
        path, _, weight = text.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: weight {weight!r} is not a number") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text}: weight must be in [0, 1000]")
    return path, value


def main(argv: list[str] | None = None, *, prog: str = "python -m trainer.data") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="tokenize a UTF-8 text file into a token file (byte-level)")
    build.add_argument("text", help="input text file (UTF-8)")
    build.add_argument("out", help="output token file")
    build.add_argument("--dtype", choices=sorted(_TORCH_DTYPES), default="uint16")
    prep = sub.add_parser("prepare", help="tokenize text/JSONL files with a tokenizer.json into a token file")
    prep.add_argument("sources", nargs="+", type=_source, metavar="FILE[:WEIGHT]",
                      help="plain text (documents separated by blank lines) or .jsonl; WEIGHT (default 1) "
                           "is how many times each document is used, fractions keep a keyed subset")
    prep.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer.json")
    prep.add_argument("--out", required=True, help="output token file (and OUT.json describing it)")
    prep.add_argument("--separator", default="", help="document separator token (default: the EOS token)")
    prep.add_argument("--dtype", choices=sorted(_TORCH_DTYPES), default="", help="default: by vocabulary size")
    prep.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the fractional-weight subsets")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            info = prepare(args.sources, args.out, tokenizer=args.tokenizer, separator=args.separator,
                           dtype=args.dtype, field=args.field, seed=args.seed)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {info['tokens']} tokens of {info['documents']} documents ({info['dtype']}, "
              f"vocabulary {info['vocab_size']}: set model.vocab_size >= it) to {args.out}")
        return 0
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.text}: {exc}", file=sys.stderr)
        return 2
    count = write_token_file(encode_bytes(text), args.out, dtype=args.dtype)
    print(f"wrote {count} tokens ({args.dtype}, vocabulary 256) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
