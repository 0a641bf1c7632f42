#!/usr/bin/env python3
"""Corpus + tokenizer preparation for the shipped default BitNet model (runs on a CPU).

Input: the plain-text dump of the King James Bible produced by Debian's `bible-kjv`
reader over the `bible-kjv-text` data (see train/README.md for the exact commands):

    .train/corpus/raw.txt      # `bible -p <datadir> gen1:1-rev22:21`

Outputs:
    .train/corpus/train.txt    # training text, one chapter per document (ignored, carried to the GPU)
    .train/corpus/val.txt      # validation text for checkpoint selection: James, 1 Peter, 2 Peter
    train/heldout.txt          # held-out text: 1 John .. Revelation (committed)
    train/tokenizer/           # tokenizer.json, tokenizer_config.json, special_tokens_map.json,
                               # generation_config.json (committed; copied into the checkpoint)

Document format: verse numbers and chapter headings are dropped; each verse is one line;
a chapter is one document. Documents are separated by a blank line in the text files;
at training time each document is encoded as `<|begin_of_text|> chapter <|end_of_text|>`.
"""
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = os.path.join(ROOT, ".train/corpus/raw.txt")
TRAIN_TXT = os.path.join(ROOT, ".train/corpus/train.txt")
HELDOUT_TXT = os.path.join(ROOT, "train/heldout.txt")
TOK_DIR = os.path.join(ROOT, "train/tokenizer")

BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
]
HELDOUT_FROM = "1 John"  # 1 John, 2 John, 3 John, Jude, Revelation: the last ~2% of the text
VAL_BOOKS = {"James", "1 Peter", "2 Peter"}  # just before the held-out: early stopping / selection
VAL_TXT = os.path.join(ROOT, ".train/corpus/val.txt")

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
VOCAB_SIZE = 4096

CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def parse_chapters(raw):
    """Return [(book, chapter, [verse, ...])] from the `bible` reader's output."""
    head = re.compile(r"^(%s) (\d+)$" % "|".join(re.escape(b) for b in BOOKS))
    verse = re.compile(r"^\s+(\d+) (.*)$")
    chapters = []
    prev_blank = True
    for line in raw.split("\n"):
        m = head.match(line)
        if m and prev_blank:
            chapters.append((m.group(1), int(m.group(2)), []))
        elif line.strip() == "":
            pass
        else:
            v = verse.match(line)
            if v:
                chapters[-1][2].append(v.group(2).strip())
            else:  # continuation line of the previous verse
                chapters[-1][2][-1] += " " + line.strip()
        prev_blank = line.strip() == ""
    return chapters


def clean_verse(v):
    v = re.sub(r"\s+", " ", v).strip()
    return v


def main():
    raw = open(RAW, encoding="utf-8").read()
    chapters = parse_chapters(raw)
    assert len(chapters) == 1189, len(chapters)
    nverses = sum(len(c[2]) for c in chapters)
    assert nverses == 31102, nverses
    docs = [(b, "\n".join(clean_verse(v) for v in vs)) for b, _, vs in chapters]
    split = BOOKS.index(HELDOUT_FROM)
    held_books = set(BOOKS[split:])
    train_docs = [d for b, d in docs if b not in held_books and b not in VAL_BOOKS]
    val_docs = [d for b, d in docs if b in VAL_BOOKS]
    held_docs = [d for b, d in docs if b in held_books]
    train_text = "\n\n".join(train_docs) + "\n"
    val_text = "\n\n".join(val_docs) + "\n"
    held_text = "\n\n".join(held_docs) + "\n"
    os.makedirs(os.path.dirname(TRAIN_TXT), exist_ok=True)
    open(TRAIN_TXT, "w", encoding="utf-8").write(train_text)
    open(VAL_TXT, "w", encoding="utf-8").write(val_text)
    open(HELDOUT_TXT, "w", encoding="utf-8").write(held_text)
    tot = len(train_text) + len(val_text) + len(held_text)
    print(f"chapters {len(chapters)} verses {nverses}; train {len(train_docs)} docs "
          f"{len(train_text)} chars; val {len(val_docs)} docs {len(val_text)} chars; "
          f"heldout {len(held_docs)} docs {len(held_text)} chars "
          f"({100 * len(held_text) / tot:.2f}%)")
    assert len(held_text.encode()) < 200_000

    # ---- tokenizer: byte-level BPE, Llama-3 style specials and BOS post-processor ----
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    bos_id, eos_id, eot_id = (tok.token_to_id(t) for t in (BOS, EOS, EOT))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        ),
    ])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    os.makedirs(TOK_DIR, exist_ok=True)
    tok.save(os.path.join(TOK_DIR, "tokenizer.json"))

    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in ((bos_id, BOS), (eos_id, EOS), (eot_id, EOT))}
    tok_cfg = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    json.dump(tok_cfg, open(os.path.join(TOK_DIR, "tokenizer_config.json"), "w"), indent=2)
    json.dump({"bos_token": {"content": BOS, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False},
               "eos_token": {"content": EOS, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False}},
              open(os.path.join(TOK_DIR, "special_tokens_map.json"), "w"), indent=2)
    json.dump({"_from_model_config": True, "bos_token_id": bos_id,
               "eos_token_id": [eos_id, eot_id], "do_sample": True,
               "temperature": 0.6, "top_p": 0.9, "max_length": 512},
              open(os.path.join(TOK_DIR, "generation_config.json"), "w"), indent=2)

    enc = tok.encode(held_docs[0][:200])
    print("ids", enc.ids[:20], "bos", bos_id, "eos", eos_id, "eot", eot_id)
    print("decode", repr(tok.decode(enc.ids)))
    n_train = sum(len(e.ids) + 1 for e in tok.encode_batch(train_docs))
    n_held = sum(len(e.ids) + 1 for e in tok.encode_batch(held_docs))
    n_val = sum(len(e.ids) + 1 for e in tok.encode_batch(val_docs))
    print(f"tokens: train {n_train} val {n_val} heldout {n_held}; chars/token "
          f"{len(train_text) / n_train:.2f}")


if __name__ == "__main__":
    sys.exit(main())
