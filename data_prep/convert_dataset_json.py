r"""Convert JSON Lines files (or files holding a JSON list of records) into MDS shards of packed tokens
(or, with --no_tokenize, of raw text: one sample per record, column 'text', tokenized by the training loader).

Each record is one document; its text is in --text_field. .gz files are read too. Example:

    python data_prep/convert_dataset_json.py data/*.jsonl --text_field text \
        --out_root s3://bucket/mds/mydata --tokenizer EleutherAI/gpt-neox-20b --concat_tokens 2048
    python data_prep/convert_dataset_json.py data/*.jsonl --out_root /data/mds/mytext --no_tokenize

Without --concat_tokens, samples of 2048 tokens are packed (llm-foundry's converters write raw text then: pass
--no_tokenize for that).
"""
import argparse

from llmfoundry.data.convert import add_convert_args, config_from_args, convert, run_cli
from llmfoundry.data.readers import JSON_EXTENSIONS, JsonFiles, find_files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files, folders (their .json/.jsonl[.gz] files) or glob patterns")
    parser.add_argument("--text_field", default="text", help="the record field holding the text (default: text)")
    parser.add_argument("--decode_errors", choices=["strict", "replace"], default="strict",
                        help="what to do with bytes that are not UTF-8 (default: stop with an error)")
    add_convert_args(parser)
    args = parser.parse_args(argv)
    files = tuple(find_files(args.inputs, JSON_EXTENSIONS))
    source = JsonFiles(files, text_field=args.text_field, decode_errors=args.decode_errors)
    return convert(source, config_from_args(args))


if __name__ == "__main__":
    run_cli(main)
