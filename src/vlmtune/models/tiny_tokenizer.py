"""The tiny model's byte-level BPE tokenizer, built deterministically with no downloads.

Same shape as Qwen2/Qwen3's tokenizer (NFC normaliser, the Qwen2 split regex, which
isolates every digit, then byte-level), a small vocabulary learned from a built-in
corpus, and every Qwen3-VL added token at its real id (151643..151668).

The BPE merges are learned by a small pure-Python trainer rather than
``tokenizers.trainers.BpeTrainer`` because the latter breaks count ties by
hash-map order, which varies between processes; a rebuilt cache would then differ.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from vlmtune.models.constants import QWEN3_VL_ADDED_TOKENS

# The Qwen2 tokenizer's pre-tokenisation regex (transformers' PRETOKENIZE_REGEX), copied so
# the tokenizer does not change if transformers moves it.
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Upper bound; with min_frequency 1 training stops once every corpus word is one token.
TINY_VOCAB_TARGET = 2048

_CORPUS = """
system
You are a helpful assistant.
user
What digit is this?
assistant
7
user
Describe the image.
assistant
A handwritten digit.
system user assistant tool
You are a helpful assistant. You are a helpful assistant that looks at images.
What digit is this? What digit is this? What digit is shown in the image?
Which digit is this? Which number is written here? Answer with a single digit.
The digit is 0. The digit is 1. The digit is 2. The digit is 3. The digit is 4.
The digit is 5. The digit is 6. The digit is 7. The digit is 8. The digit is 9.
zero one two three four five six seven eight nine ten eleven twelve hundred thousand
0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 2024 3.14
Describe the image. Describe this picture in one sentence. What is in the picture?
What color is the square? The square is red. The circle is blue. The line is green.
What do you see? I see a small black and white image of a handwritten number.
Is there a cat in the photo? Yes, there is a cat on the table. No, there is no dog.
How many objects are there? There are three objects: a box, a ball and a cup.
Count the dots. There are five dots. Left, right, top, bottom, center, middle, corner.
Please answer the question. Thank you! Sure, here is the answer. Let me think about it.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
This is an image of a chart. The chart shows the value going up over time.
Read the text in the image. The sign says stop. The label says open.
Question: what is shown? Answer: a number. Question: which class? Answer: yes or no.
The model should learn to answer correctly, and to stop when the answer is complete.
In the first image there is a bright light, and in the second image it is dark.
Compare the two images. The first one is larger than the second one.
Write a short caption for the image. A person walking in the park on a sunny day.
I am not sure. It looks like a small shape. It could be a letter or a number.
good bad correct wrong true false yes no maybe right left up down big small
red green blue yellow black white gray orange purple pink brown light dark
the a an and or but if then else of to in on at for with from by as is are was were
be been have has had do does did will would can could should may might must not
it this that these those there here what which who whom whose when where why how
I you he she we they me him her us them my your his its our their mine yours
image images picture pictures photo photos video frame text number numbers digit digits
one of the, in the, on the, it is, there is, there are, this is, that is, what is
Hello! How are you? I am fine, thank you. Good morning. Good night. Goodbye.
The answer is correct. The answer is wrong. Try again. Well done. Great job.
""".strip()


def _split_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_bpe(
    text: str, vocab_size: int = TINY_VOCAB_TARGET, min_frequency: int = 1
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges; ties go to the lexicographically smallest pair."""
    pre = _split_pre_tokenizer()
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(text))
    # Sorted so that ids follow GPT-2's byte order ("!" = 0, "\n" = 198, " " = 220, "0" = 15),
    # the same base ids as the real Qwen vocabulary.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    splits = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = splits[word]
            for a, b in zip(symbols, symbols[1:], strict=False):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        merged = best[0] + best[1]
        vocab.setdefault(merged, len(vocab))
        for word, symbols in splits.items():
            if len(symbols) < 2:
                continue
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    return vocab, merges


def build_tiny_tokenizer() -> Tokenizer:
    """The tokenizers-level object, with Qwen3-VL's added tokens at their real ids.

    The added tokens are also entries of the BPE vocabulary at their ids: ``tokenizers``
    assigns an added token the model's id when the model knows it, and otherwise the
    next free id, which would close the gap between the small vocab and 151643.
    """
    vocab, merges = train_bpe(_CORPUS)
    for content, token_id, _ in QWEN3_VL_ADDED_TOKENS:
        vocab[content] = token_id
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _split_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [
            AddedToken(content, special=special, normalized=False)
            for content, _, special in QWEN3_VL_ADDED_TOKENS
        ]
    )
    for content, token_id, _ in QWEN3_VL_ADDED_TOKENS:
        got = tok.token_to_id(content)
        if got != token_id:  # a tokenizers change would silently shift every id: refuse
            raise RuntimeError(f"tokenizer put {content!r} at {got}, expected {token_id}")
    return tok


def write_tiny_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json loadable as Qwen2Tokenizer."""
    build_tiny_tokenizer().save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "model_max_length": 262144,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
