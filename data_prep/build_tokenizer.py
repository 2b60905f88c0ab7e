"""Train a small gpt-neox-style byte-level BPE tokenizer (``<|endoftext|>`` = id 0) and save it for AutoTokenizer.

Inputs are text/source files (one document each) and .json/.jsonl files (a text field per record); with no
inputs it trains on the bundled corpus. Example:

    python data_prep/build_tokenizer.py my_texts/ --extensions .txt .jsonl --vocab_size 8192 --out /tmp/tok
"""
import argparse
import itertools

from llmfoundry.data.convert import run_cli
from llmfoundry.data.bundled import corpus_documents
from llmfoundry.data.readers import JSON_EXTENSIONS, JsonFiles, TextFiles, find_files, iter_documents
from llmfoundry.data.bpe import train_bpe_tokenizer
from llmfoundry.data.tokenizer import padded_vocab_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="files, folders or glob patterns (default: the tiny default corpus, read from this Python)")
    parser.add_argument("--extensions", nargs="*", default=None, help="only take these file endings from folders")
    parser.add_argument("--out", required=True, help="folder to save the tokenizer in")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--text_field", default="text", help="text field of JSON records")
    args = parser.parse_args(argv)
    if args.inputs:
        files = find_files(args.inputs, args.extensions)
        json_files = tuple(f for f in files if f.endswith(JSON_EXTENSIONS))
        text_files = tuple(f for f in files if not f.endswith(JSON_EXTENSIONS))
        docs = itertools.chain(iter_documents(JsonFiles(json_files, args.text_field)),
                               iter_documents(TextFiles(text_files)))
    else:
        docs = corpus_documents()
    tokenizer = train_bpe_tokenizer(docs, args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out} (model vocab_size: {padded_vocab_size(tokenizer)})")
    return tokenizer


if __name__ == "__main__":
    run_cli(main)
