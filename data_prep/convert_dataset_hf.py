r"""Convert a Hugging Face dataset (hub name or local path), split by split, into MDS shards of packed tokens
(or, with --no_tokenize, of raw text: one sample per record, column 'text', tokenized by the training loader).

Data is read in streaming mode; each split goes to <out_root>/<split>. Examples:

    python data_prep/convert_dataset_hf.py --dataset allenai/c4 --data_subset en --splits train validation \
        --out_root s3://bucket/mds/c4 --tokenizer EleutherAI/gpt-neox-20b --concat_tokens 2048 --processes 16
    python data_prep/convert_dataset_hf.py --dataset json --data_files data/*.jsonl --splits train \
        --out_root /data/mds/mydata
    python data_prep/convert_dataset_hf.py --dataset ./saved_with_save_to_disk --splits train test --out_root out
    python data_prep/convert_dataset_hf.py --dataset json --data_files data/*.jsonl --splits train \
        --out_root /data/mds/mytext --no_tokenize
"""
import argparse
from dataclasses import replace

from llmfoundry.data.convert import add_convert_args, config_from_args, convert, join_out, run_cli
from llmfoundry.data.readers import HFDataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help="hub name (allenai/c4), builder (json, parquet, text) or local folder")
    parser.add_argument("--data_subset", default=None, help="dataset config name, e.g. en for allenai/c4")
    parser.add_argument("--data_files", nargs="*", default=None, help="data files for a builder such as json")
    parser.add_argument("--splits", nargs="+", default=["train"], help="splits to convert (default: train)")
    parser.add_argument("--text_field", default="text", help="the field holding the text (default: text)")
    add_convert_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    sources = {split: HFDataset(args.dataset, args.data_subset, split, args.text_field,
                                tuple(args.data_files) if args.data_files else None) for split in args.splits}
    for source in sources.values():
        source.units()  # open every split first: a bad split name stops before hours of converting the others
    return {split: convert(source, replace(cfg, out_root=join_out(args.out_root, split)))
            for split, source in sources.items()}


if __name__ == "__main__":
    run_cli(main)
