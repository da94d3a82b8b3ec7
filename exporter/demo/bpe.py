"""The demo's byte-level BPE, laid out as CLIP's: the 256 byte characters, the same with the end-of-word marker, merges
learned from the training captions (most frequent pair first), then <|startoftext|> and <|endoftext|>. The demo's
vocab.json and merges.txt are what bpe_files() returns; tests build their own tiny vocabularies on byte_characters().
"""

from __future__ import annotations

import json


def byte_characters() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the first 256 entries of CLIP's vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first (ties: the lexicographically smallest), until every word of
    `words` is one token: CLIP's BPE with its end-of-word marker, learned from the captions."""
    from collections import Counter

    counts = Counter(words)
    segs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in counts}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w, seg in segs.items():
            for pair in zip(seg, seg[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seg in segs.items():
            i, out = 0, []
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = out


def bpe_files() -> dict[str, str]:
    """vocab.json and merges.txt of the demo's CLIP BPE, laid out as CLIP's: 256 byte characters, the same with
    "</w>", the merges learned from the training captions, then <|startoftext|> and <|endoftext|>."""
    from tinyprune.demo.captions import training_captions, vocabulary_gap, words

    gap = vocabulary_gap()
    if gap:
        raise SystemExit(f"held-out captions use words training never shows: {sorted(gap)}")
    merges = learn_merges(words(training_captions()))
    chars = list(byte_characters().values())
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {"vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"}
