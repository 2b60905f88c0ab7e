"""Convert parquet files with a text column into MDS shards of packed tokens (or, with
--no_tokenize, of raw text: one sample per row, column 'text', tokenized by the training loader).

Each row is one document. Example:

    python data_prep/convert_dataset_parquet.py data/ --text_field content --out_root /data/mds/mydata
"""
import argparse

from llmfoundry.data.convert import add_convert_args, config_from_args, convert, run_cli
from llmfoundry.data.readers import PARQUET_EXTENSIONS, ParquetFiles, find_files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files, folders (their .parquet files) or glob patterns")
    parser.add_argument("--text_field", default="text", help="the column holding the text (default: text)")
    add_convert_args(parser)
    args = parser.parse_args(argv)
    source = ParquetFiles(tuple(find_files(args.inputs, PARQUET_EXTENSIONS)), text_field=args.text_field)
    return convert(source, config_from_args(args))


if __name__ == "__main__":
    run_cli(main)
