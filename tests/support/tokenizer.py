"""A small BPE tokenizer trained offline in well under a second, saved as a Hugging Face tokenizer folder."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "a blue rectangle.", "a red circle on a plain background.", "an image of a green triangle.",
    "there is a yellow circle in the picture.", "what color is the shape?", "is there a teal rectangle?",
    "a man with a red helmet on a small moped on a dirt road.", "a giraffe eating food from the top of the tree.",
    "gray brown black shape yes no", "closeup of bins of food that include broccoli and bread.",
]


def make_tokenizer(out_dir: str | Path, vocab_size: int = 120) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return fast
