r"""Convert text or source files (files, folders, glob patterns) into MDS shards of packed tokens
(or, with --no_tokenize, of raw text: one sample per file, column 'text', tokenized by the training loader).

Each file is one document. The documents are packed back to back in input order (the files as given, each
folder's files sorted by path), each followed by EOS; only the final partial sample is dropped. Example:

    python data_prep/convert_text_to_mds.py 'src/**/*.py' docs/ --extensions .py .md \
        --out_root /data/mds/code --tokenizer EleutherAI/gpt-neox-20b --concat_tokens 2048 --processes 8
"""
import argparse

from llmfoundry.data.convert import add_convert_args, config_from_args, convert, run_cli
from llmfoundry.data.readers import TextFiles, find_files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files, folders (searched recursively) or glob patterns")
    parser.add_argument("--extensions", nargs="*", default=None,
                        help="only take files with these endings from folders (e.g. .py .txt); default: all")
    parser.add_argument("--decode_errors", choices=["strict", "replace"], default="strict",
                        help="what to do with bytes that are not UTF-8 (default: stop with an error)")
    add_convert_args(parser)
    args = parser.parse_args(argv)
    source = TextFiles(tuple(find_files(args.inputs, args.extensions)), decode_errors=args.decode_errors)
    return convert(source, config_from_args(args))


if __name__ == "__main__":
    run_cli(main)
