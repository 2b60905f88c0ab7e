"""Train a small gpt-neox-style byte-level BPE tokenizer (the tiny default data's, and data_prep/build_tokenizer.py's).

Conventions: byte-level BPE (no unknown bytes, no prefix space), NFC normalization, one special token
``<|endoftext|>`` with id 0 that serves as EOS, BOS and UNK. The result is a ``PreTrainedTokenizerFast``; saved with
``save_pretrained(dir)``, ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""
from __future__ import annotations

from typing import Iterable

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a gpt-neox-style byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Save it with ``.save_pretrained(dir)``; ``load_tokenizer(dir)`` loads it back.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS_TOKEN) == 0
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, clean_up_tokenization_spaces=False)
